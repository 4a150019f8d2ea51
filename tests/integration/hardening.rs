//! The HTTP front under hostile clients: request heads that never end or
//! are too large, stalled bodies, more connections than allowed (all through
//! `tokenhub::server::serve`, the loop `tokenhub serve` runs).

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
