//! The HTTP front under hostile clients: request heads that never end or
//! are too large, stalled bodies, more connections than allowed (all through
//! `tokenhub::server::serve`, the loop `tokenhub serve` runs); client
//! addresses that cannot be forged past the failure limiter; the SQLite
//! vault's files readable by tokenhub's user only; `__Host-` cookies.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::*;

/// How a connection ended, seen from the client.
#[derive(Debug)]
struct Closed {
    /// Everything the server sent before closing.
    bytes: Vec<u8>,
    /// When the server closed it (EOF or reset).
    after: Duration,
}

/// Reads until the server closes the connection; `None` if it is still open
/// after `within`.
async fn read_until_closed(stream: &mut TcpStream, started: Instant, within: Duration) -> Option<Closed> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    closed.ok().map(|()| Closed { bytes, after: started.elapsed() })
}

/// This process's resident memory in KiB (tokenhub runs in it).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.addr()).await.unwrap()
}

#[tokio::test]
async fn request_heads_that_never_end_are_closed_within_the_header_timeout() {
    let app = TestApp::builder(&Idp::shared().issuer).settings(|s| s.header_read_timeout = Some(1)).spawn().await;
    assert_eq!(reqwest::get(app.url("/healthz")).await.unwrap().status(), StatusCode::OK);
    let before = rss_kib();

    // 50 connections, each with 8 KiB of a request head that never ends
    // (under the 16 KiB bound: only the timeout can end them).
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = connect(&app).await;
        let head = format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: {}", "a".repeat(8192));
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    // tokenhub answers others meanwhile.
    let response = reqwest::get(app.url("/healthz")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let during = rss_kib();

    let closed = futures::future::join_all(slow.iter_mut().map(|s| read_until_closed(s, started, Duration::from_secs(6)))).await;
    for (i, closed) in closed.iter().enumerate() {
        let closed = closed.as_ref().unwrap_or_else(|| panic!("connection {i} is still open after 6 s"));
        assert!(closed.after >= Duration::from_millis(800), "connection {i} was closed before the timeout: {closed:?}");
        assert!(!closed.bytes.starts_with(b"HTTP/1.1 2"), "connection {i} got an answer to half a request");
    }
    // The buffers went with the connections (loosely: other tests run in
    // this process too).
    let after = rss_kib();
    eprintln!("resident memory: {before} KiB before, {during} KiB with 50 stalled heads, {after} KiB after");
    assert!(after < before + 64 * 1024, "resident memory grew from {before} KiB to {after} KiB");

    // A kept-alive connection that stays silent after its answer is closed
    // as well.
    let mut idle = connect(&app).await;
    let started = Instant::now();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let closed = read_until_closed(&mut idle, started, Duration::from_secs(6)).await.expect("the idle connection is closed");
    assert!(closed.bytes.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&closed.bytes));
    assert!(closed.after >= Duration::from_millis(800), "closed before the timeout: {closed:?}");
}

#[tokio::test]
async fn an_oversized_request_head_gets_431_at_once() {
    // A long header timeout: only the size bound can answer in time.
    let app = TestApp::builder(&Idp::shared().issuer)
        .settings(|s| {
            s.header_read_timeout = Some(60);
            s.max_header_bytes = Some(8192);
        })
        .spawn()
        .await;
    for size in [20_000, 300_000] {
        let mut stream = connect(&app).await;
        let started = Instant::now();
        let head = format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n", "a".repeat(size));
        // tokenhub may close before it has read everything.
        let _ = stream.write_all(head.as_bytes()).await;
        let closed = read_until_closed(&mut stream, started, Duration::from_secs(5)).await.expect("answered, not held");
        assert!(
            closed.bytes.is_empty() || closed.bytes.starts_with(b"HTTP/1.1 431"),
            "{}",
            String::from_utf8_lossy(&closed.bytes)
        );
    }
    // A head within the bound is served.
    let response = reqwest::Client::new().get(app.url("/healthz")).header("x-big", "a".repeat(6000)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_stalled_request_body_ends_the_connection() {
    let app = TestApp::builder(&Idp::shared().issuer)
        .settings(|s| {
            s.header_read_timeout = Some(60);
            s.body_read_timeout = Some(1);
        })
        .spawn()
        .await;
    let mut stream = connect(&app).await;
    let started = Instant::now();
    let head = "POST /oauth2/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                Content-Length: 1000\r\n\r\ngrant_type=";
    stream.write_all(head.as_bytes()).await.unwrap();
    let closed = read_until_closed(&mut stream, started, Duration::from_secs(6)).await.expect("the stalled request ends");
    assert!(closed.after >= Duration::from_millis(800), "ended before the timeout: {closed:?}");
    let text = String::from_utf8_lossy(&closed.bytes);
    assert!(closed.bytes.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
}

#[tokio::test]
async fn connections_above_the_limit_wait_for_a_free_one() {
    let app = TestApp::builder(&Idp::shared().issuer)
        .settings(|s| {
            s.header_read_timeout = Some(1);
            s.max_connections = Some(3);
        })
        .spawn()
        .await;
    // Three silent connections take every slot until the timeout ends them.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect(&app).await);
    }
    let response = reqwest::get(app.url("/healthz")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800), "a fourth connection was served at once ({waited:?})");
    for stream in &mut silent {
        assert!(read_until_closed(stream, started, Duration::from_secs(5)).await.is_some());
    }
}

// ---------------------------------------------------------------- client addresses

/// A client whose connections come from `ip` (any 127/8 address is this
/// machine's loopback on Linux: distinct peers for tokenhub).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(ip.parse::<IpAddr>().unwrap()).build().unwrap()
}

/// The hub's token request with these client credentials (and forwarded
/// address, if any): 400 `invalid_grant` when they are right, 401 when
/// wrong, 429 while the client is slowed down.
async fn token_request(client: &reqwest::Client, app: &TestApp, secret: &str, forwarded: Option<&str>) -> StatusCode {
    let mut request = client
        .post(app.url("/oauth2/token"))
        .basic_auth(HUB_CLIENT_ID, Some(secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "not-a-token")]);
    if let Some(forwarded) = forwarded {
        request = request.header("x-forwarded-for", forwarded);
    }
    request.send().await.unwrap().status()
}

async fn spawn_request(client: &reqwest::Client, app: &TestApp) -> StatusCode {
    let request = client.post(app.url("/api/v1/hub/spawn")).basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET));
    request.json(&serde_json::json!({"user": "nobody-here"})).send().await.unwrap().status()
}

fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn a_direct_caller_cannot_pass_for_the_hub_nor_escape_the_limiter() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let audit_path = audit.display().to_string();
    let app = TestApp::builder(&Idp::shared().issuer).settings(|s| s.audit_log = Some(audit_path)).spawn().await;
    let hub = client_from("127.0.0.2");
    let server = client_from("127.0.0.3");

    // A user's server fails client authentication again and again, saying
    // it is the hub: it is slowed down itself, by its own address.
    let mut statuses = vec![];
    for _ in 0..14 {
        statuses.push(token_request(&server, &app, "wrong", Some("127.0.0.2")).await);
    }
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{statuses:?}");
    assert!(statuses[11..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    // The hub's own token exchange and spawn hook are not.
    assert_eq!(token_request(&hub, &app, HUB_CLIENT_SECRET, None).await, StatusCode::BAD_REQUEST);
    assert_eq!(spawn_request(&hub, &app).await, StatusCode::NOT_FOUND, "unknown user, not 429");
    // Another forwarded address every time changes nothing.
    for i in 0..5 {
        let forged = format!("198.51.100.{i}");
        assert_eq!(token_request(&server, &app, "wrong", Some(&forged)).await, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(token_request(&server, &app, HUB_CLIENT_SECRET, Some("127.0.0.2")).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(spawn_request(&hub, &app).await, StatusCode::NOT_FOUND);

    // A fresh caller rotating the header from its first request is slowed
    // down all the same.
    let rotating = client_from("127.0.0.4");
    let mut statuses = vec![];
    for i in 0..14 {
        statuses.push(token_request(&rotating, &app, "wrong", Some(&format!("203.0.113.{i}"))).await);
    }
    assert!(statuses[11..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");

    // The audit log names the real peers, never a forged address.
    let lines = audit_lines(&audit);
    let refused: Vec<&str> = lines.iter().filter(|l| l["event"] == "refused").map(|l| l["client"].as_str().unwrap()).collect();
    assert!(!refused.is_empty());
    assert!(refused.iter().all(|c| *c == "127.0.0.3" || *c == "127.0.0.4"), "{refused:?}");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains("198.51.100.") && !text.contains("203.0.113."), "{text}");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let audit_path = audit.display().to_string();
    // 127.0.0.5 plays the hub's proxy, 10.0.0.0/8 an ingress in front of it.
    let app = TestApp::builder(&Idp::shared().issuer)
        .settings(|s| {
            s.audit_log = Some(audit_path);
            s.trusted_proxies = Some("127.0.0.5, 10.0.0.0/8".into());
        })
        .spawn()
        .await;
    let proxy = client_from("127.0.0.5");

    // One browser behind the proxy fails too often: it is slowed down...
    let mut statuses = vec![];
    for _ in 0..12 {
        statuses.push(token_request(&proxy, &app, "wrong", Some("192.0.2.1, 203.0.113.7")).await);
    }
    assert_eq!(statuses.last(), Some(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    // ...through another trusted hop too...
    assert_eq!(
        token_request(&proxy, &app, HUB_CLIENT_SECRET, Some("203.0.113.7, 10.1.2.3")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // ...while other clients behind the same proxy, and the proxy's own
    // requests, are not.
    assert_eq!(token_request(&proxy, &app, HUB_CLIENT_SECRET, Some("203.0.113.8")).await, StatusCode::BAD_REQUEST);
    assert_eq!(token_request(&proxy, &app, HUB_CLIENT_SECRET, Some("203.0.113.7, 203.0.113.9")).await, StatusCode::BAD_REQUEST);
    assert_eq!(token_request(&proxy, &app, HUB_CLIENT_SECRET, None).await, StatusCode::BAD_REQUEST);
    // A peer that is not a trusted proxy is its own client, whatever it forwards.
    let direct = client_from("127.0.0.6");
    assert_eq!(token_request(&direct, &app, HUB_CLIENT_SECRET, Some("203.0.113.8")).await, StatusCode::BAD_REQUEST);
    assert_eq!(token_request(&direct, &app, "wrong", Some("203.0.113.7")).await, StatusCode::UNAUTHORIZED);

    let lines = audit_lines(&audit);
    let refused: Vec<&str> = lines.iter().filter(|l| l["event"] == "refused").map(|l| l["client"].as_str().unwrap()).collect();
    // Eleven refusals (the twelfth attempt met the limiter first), all
    // under the forwarded address.
    assert_eq!(refused.iter().filter(|c| **c == "203.0.113.7").count(), 11, "{refused:?}");
    assert_eq!(refused.last(), Some(&"127.0.0.6"), "{refused:?}");
}

// ---------------------------------------------------------------- the vault's files

#[cfg(unix)]
#[tokio::test]
async fn the_sqlite_files_are_private_to_tokenhubs_user() {
    use std::os::unix::fs::PermissionsExt as _;
    // Whatever the umask would give (typically 0644).
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let (code, login) = Hub::login(&app, &Browser::new(), "wanda").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    assert_eq!(app.lineage_count().await, 1);
    let db = app.db_path.display().to_string();
    for file in [db.clone(), format!("{db}-wal"), format!("{db}-shm")] {
        let mode = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{file}: {e}")).permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} has mode {mode:o}");
    }
}

// ---------------------------------------------------------------- cookies

use axum_extra::extract::cookie::{Cookie, SameSite};

/// The cookies a response sets.
fn set_cookies(response: &reqwest::Response) -> Vec<Cookie<'static>> {
    let values = response.headers().get_all("set-cookie");
    values.iter().map(|v| Cookie::parse(v.to_str().unwrap().to_string()).unwrap()).collect()
}

fn only_cookie(response: &reqwest::Response, name: &str) -> Cookie<'static> {
    let cookies = set_cookies(response);
    let found: Vec<_> = cookies.iter().filter(|c| c.name() == name).collect();
    assert_eq!(found.len(), 1, "one {name} expected in {cookies:?}");
    found[0].clone()
}

/// A browser without a cookie jar of its own: the test sends tokenhub's
/// cookies itself (a cookie store would not send `Secure` cookies over the
/// test's plain http).
fn navigating_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("sec-fetch-mode", "navigate".parse().unwrap());
    headers.insert("sec-fetch-dest", "document".parse().unwrap());
    headers.insert("sec-fetch-site", "none".parse().unwrap());
    reqwest::Client::builder().default_headers(headers).redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// A hub login through tokenhub at `public_url` (https), checking the login
/// and session cookies: named with `prefix`, Secure, HttpOnly, SameSite=Lax,
/// no Domain, on these paths. Returns the session cookie.
async fn login_checking_cookies(
    app: &TestApp,
    user: &str,
    prefix: &str,
    login_path: &str,
    session_path: &str,
) -> Cookie<'static> {
    let client = navigating_client();
    let (authorize, hub_login) = Hub::authorize_url(app);
    let response = client.get(authorize).send().await.unwrap();
    let to_idp = location(&response);
    let state = query(&to_idp, "state").unwrap();
    let login_cookie = only_cookie(&response, &format!("{prefix}tokenhub_login_{state}"));
    assert_eq!(login_cookie.secure(), Some(true));
    assert_eq!(login_cookie.http_only(), Some(true));
    assert_eq!(login_cookie.same_site(), Some(SameSite::Lax));
    assert_eq!(login_cookie.path(), Some(login_path));
    assert_eq!(login_cookie.domain(), None);

    let back = Browser::new().sign_in_at_idp(to_idp, user).await;
    let callback = format!("{}?{}", app.url("/callback"), back.query().unwrap());
    // Under the name tokenhub wrote it: the login finishes.
    let response = client.get(&callback).header("cookie", login_cookie.stripped().to_string()).send().await.unwrap();
    let to_hub = location(&response);
    assert!(to_hub.as_str().starts_with(HUB_REDIRECT_URI), "{to_hub}");
    let removed = only_cookie(&response, login_cookie.name());
    assert_eq!((removed.value(), removed.path(), removed.secure()), ("", Some(login_path), Some(true)), "{removed}");
    let session = only_cookie(&response, &format!("{prefix}tokenhub_session"));
    assert_eq!(session.secure(), Some(true));
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(session.same_site(), Some(SameSite::Lax));
    assert_eq!(session.path(), Some(session_path));
    assert_eq!(session.domain(), None);
    let code = query(&to_hub, "code").unwrap();
    assert_eq!(Hub::exchange_code(app, &code, &hub_login).await.status(), StatusCode::OK);
    session
}

async fn token_page(app: &TestApp, cookie: &str) -> String {
    let response = navigating_client().get(app.url("/")).header("cookie", cookie).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

#[tokio::test]
async fn on_its_own_https_host_tokenhubs_cookies_are_host_only() {
    let app = TestApp::builder(&Idp::shared().issuer)
        .settings(|s| s.public_url = Some(url::Url::parse("https://tokens.example.org/").unwrap()))
        .spawn()
        .await;
    let session = login_checking_cookies(&app, "xena", "__Host-", "/", "/").await;
    assert!(token_page(&app, &session.stripped().to_string()).await.contains("Tokens of xena"));
    // The same value under the plain name (as a sibling host could plant
    // one) is not read.
    let planted = format!("tokenhub_session={}", session.value());
    assert!(!token_page(&app, &planted).await.contains("Tokens of xena"));
    // A login cookie under the plain name does not finish a login either.
    let client = navigating_client();
    let (authorize, _) = Hub::authorize_url(&app);
    let response = client.get(authorize).send().await.unwrap();
    let to_idp = location(&response);
    let state = query(&to_idp, "state").unwrap();
    let login_cookie = only_cookie(&response, &format!("__Host-tokenhub_login_{state}"));
    let back = Browser::new().sign_in_at_idp(to_idp, "xena").await;
    let callback = format!("{}?{}", app.url("/callback"), back.query().unwrap());
    let planted = format!("tokenhub_login_{state}={}", login_cookie.value());
    let response = client.get(&callback).header("cookie", planted).send().await.unwrap();
    assert_error_page(response, StatusCode::BAD_REQUEST).await;

    // Signing out removes the cookie under its name and attributes.
    let response = client.get(app.url("/logout")).header("cookie", session.stripped().to_string()).send().await.unwrap();
    let removed = only_cookie(&response, "__Host-tokenhub_session");
    assert_eq!((removed.value(), removed.path(), removed.secure()), ("", Some("/"), Some(true)), "{removed}");
}

#[tokio::test]
async fn under_a_path_on_https_tokenhubs_cookies_are_secure_prefixed() {
    let app = TestApp::builder(&Idp::shared().issuer)
        .base_path("/services/tokenhub")
        .settings(|s| s.public_url = Some(url::Url::parse("https://hub.example.org/services/tokenhub/").unwrap()))
        .spawn()
        .await;
    let session = login_checking_cookies(&app, "yuri", "__Secure-", "/services/tokenhub/callback", "/services/tokenhub").await;
    assert!(token_page(&app, &session.stripped().to_string()).await.contains("Tokens of yuri"));
}

#[tokio::test]
async fn over_plain_http_the_cookie_names_stay() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let response = navigating_client().get(Hub::authorize_url(&app).0).send().await.unwrap();
    let state = query(&location(&response), "state").unwrap();
    let cookie = only_cookie(&response, &format!("tokenhub_login_{state}"));
    assert_eq!((cookie.path(), cookie.secure()), (Some("/callback"), None));
}
