//! The refresh-storm benchmark (`scripts/storm.sh` builds and runs it; not a
//! test: it prints numbers to compare between runs). Real parts: the test
//! IdP (npm `oidc-provider`), tokenhub's release binary as separate
//! processes, SQLite and a PostgreSQL server; the hub is a stub answering
//! `GET /hub/api/user` for the callers' tokens (the hub's own latency is
//! not what is measured here).
//!
//! For one replica on SQLite, one on PostgreSQL and two on PostgreSQL: 100
//! users sign in (the browser flow, through the IdP's form), their access
//! tokens expire, then 1,000 callers at once (10 per user, spread over the
//! replicas) ask for tokens. Printed: refreshes the IdP answered (target:
//! exactly 100), errors (target: 0), the storm's wall time against the
//! IdP's own refresh latency (as tokenhub measured it), each replica's peak
//! resident memory, and the hot path (tokens fresh, 64 connections, 5 s).
//! Then tokenhub's start time and resident memory with 10,000 and 100,000
//! lineages in a SQLite vault.
//!
//! Environment: `STORM_POSTGRES_URL` (a server to make databases in),
//! `TOKENHUB_BIN` (the release binary), `STORM_LINEAGES` (default
//! `10000,100000`).

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::routing::get;
use serde_json::{Value, json};

const CLIENT_ID: &str = "tokenhub";
const CLIENT_SECRET: &str = "storm-client-secret";
const CRYPT_KEY: &str = "3f1c2b3a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
const USERS: usize = 100;
const CALLERS: usize = 1000;
/// The IdP's access-token lifetime: the storm waits it out.
const ACCESS_TTL: u64 = 8;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stub of the hub's `GET /hub/api/user`: token `storm-<user>` is `<user>`'s.
async fn stub_hub() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/hub/api/user",
        get(|request: Request| async move {
            let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            match auth.strip_prefix("token storm-") {
                Some(user) => axum::Json(json!({
                    "kind": "user", "name": user, "servers": {},
                    "scopes": ["access:services!service=tokenhub"], "token_id": format!("a-{user}"),
                }))
                .into_response(),
                None => axum::http::StatusCode::FORBIDDEN.into_response(),
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

use axum::response::IntoResponse as _;

struct Idp {
    child: Child,
    issuer: String,
}

fn start_idp(callbacks: &[String]) -> Idp {
    let port = free_port();
    let state = tempfile::tempdir().unwrap().keep();
    let child = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/idp/server.mjs"))
        .envs([
            ("IDP_PORT", port.to_string()),
            ("IDP_STATE_DIR", state.display().to_string()),
            ("IDP_CLIENT_ID", CLIENT_ID.into()),
            ("IDP_CLIENT_SECRET", CLIENT_SECRET.into()),
            ("IDP_REDIRECT_URIS", callbacks.join(",")),
            ("IDP_ACCESS_TOKEN_TTL", ACCESS_TTL.to_string()),
            ("IDP_TEST_CONTROL", "1".into()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("node runs");
    wait_for_port(port);
    Idp { child, issuer: format!("http://127.0.0.1:{port}") }
}

struct Replica {
    child: Child,
    url: String,
}

impl Replica {
    async fn start(bin: &str, port: u16, idp: &Idp, hub: u16, database: &str) -> (Replica, Duration) {
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("serve")
            .env_clear()
            .envs([
                ("TOKENHUB_BIND", format!("127.0.0.1:{port}")),
                ("TOKENHUB_PUBLIC_URL", url.clone()),
                ("TOKENHUB_OIDC_ISSUER", idp.issuer.clone()),
                ("TOKENHUB_OIDC_CLIENT_ID", CLIENT_ID.into()),
                ("TOKENHUB_OIDC_CLIENT_SECRET", CLIENT_SECRET.into()),
                ("TOKENHUB_HUB_CLIENT_ID", "jupyterhub".into()),
                ("TOKENHUB_HUB_CLIENT_SECRET", "storm-hub-secret".into()),
                ("TOKENHUB_HUB_REDIRECT_URI", "http://127.0.0.1:1/hub/oauth_callback".into()),
                ("JUPYTERHUB_API_URL", format!("http://127.0.0.1:{hub}/hub/api")),
                ("JUPYTERHUB_API_TOKEN", "storm-service-token".into()),
                ("JUPYTERHUB_CRYPT_KEY", CRYPT_KEY.into()),
                ("TOKENHUB_DATABASE_URL", database.into()),
                ("TOKENHUB_DATABASE_POOL_SIZE", "20".into()),
                ("TOKENHUB_KEEPALIVE_INTERVAL", "0".into()),
                ("TOKENHUB_SHARE_CHECK_INTERVAL", "0".into()),
                ("TOKENHUB_LOG", "warn".into()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tokenhub runs");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !client.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "tokenhub did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (Replica { child, url }, started.elapsed())
    }

    fn peak_mb(&self) -> f64 {
        status_mb(self.child.id(), "VmHWM:")
    }

    fn rss_mb(&self) -> f64 {
        status_mb(self.child.id(), "VmRSS:")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: Option<f64> =
        status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok());
    kb.map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Signs `user` in to tokenhub's own page: tokenhub → the IdP's form → back.
async fn sign_in(replica: &Replica, user: &str) {
    // A top-level navigation typed into the address bar, as tokenhub's pages require.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("sec-fetch-mode", "navigate".parse().unwrap());
    headers.insert("sec-fetch-dest", "document".parse().unwrap());
    headers.insert("sec-fetch-site", "none".parse().unwrap());
    let browser = reqwest::Client::builder().default_headers(headers).cookie_store(true).build().unwrap();
    let form = browser.get(format!("{}/login", replica.url)).send().await.unwrap();
    let at = form.url().clone();
    let page = form.text().await.unwrap();
    let action = page.split("action=\"").nth(1).and_then(|s| s.split('"').next()).expect("the IdP's sign-in form");
    let done = browser.post(at.join(action).unwrap()).form(&[("login", user), ("password", "x")]).send().await.unwrap();
    assert!(done.status().is_success() && done.url().as_str().starts_with(&replica.url), "{user} signed in: {}", done.url());
}

async fn idp_refreshes(idp: &Idp) -> u64 {
    let stats: Value = reqwest::get(format!("{}/_test/stats", idp.issuer)).await.unwrap().json().await.unwrap();
    stats["refresh_token"].as_u64().unwrap()
}

/// tokenhub's own measure of the IdP's refresh latency: sum and count.
async fn idp_latency(replicas: &[Replica]) -> (f64, f64) {
    let mut totals = (0.0, 0.0);
    for replica in replicas {
        let text = reqwest::get(format!("{}/metrics", replica.url)).await.unwrap().text().await.unwrap();
        for line in text.lines() {
            let value = |name: &str| line.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok());
            if let Some(v) = value("tokenhub_upstream_refresh_duration_seconds_sum ") {
                totals.0 += v;
            }
            if let Some(v) = value("tokenhub_upstream_refresh_duration_seconds_count ") {
                totals.1 += v;
            }
        }
    }
    totals
}

async fn get_tokens(client: &reqwest::Client, replica: &Replica, user: &str) -> bool {
    let response =
        client.get(format!("{}/api/v1/tokens", replica.url)).header("authorization", format!("token storm-{user}")).send().await;
    answered(response).await
}

/// Whether a request came back 2xx with its whole body.
async fn answered(response: reqwest::Result<reqwest::Response>) -> bool {
    match response {
        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
        _ => false,
    }
}

/// Requests/s and p99 of the hot path (tokens fresh), 64 connections, 5 s.
async fn hot_path(replicas: &[Replica], users: &[String]) -> (f64, f64) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let replicas = Arc::new(replicas.iter().map(|r| r.url.clone()).collect::<Vec<_>>());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (client, replicas, user) = (client.clone(), replicas.clone(), users[i % users.len()].clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let url = format!("{}/api/v1/tokens", replicas[i % replicas.len()]);
                    let r = client.get(url).header("authorization", format!("token storm-{user}")).send().await;
                    if answered(r).await {
                        latencies.push(started.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let p99 = all.get(all.len() * 99 / 100).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    (all.len() as f64 / 5.0, p99)
}

async fn storm(name: &str, bin: &str, replicas_n: usize, database: &str) {
    let ports: Vec<u16> = (0..replicas_n).map(|_| free_port()).collect();
    let callbacks: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}/callback")).collect();
    let mut idp = start_idp(&callbacks);
    let hub = stub_hub().await;
    let mut replicas = Vec::new();
    for port in &ports {
        replicas.push(Replica::start(bin, *port, &idp, hub, database).await.0);
    }
    let users: Vec<String> = (0..USERS).map(|i| format!("storm{i:03}")).collect();
    for user in &users {
        sign_in(&replicas[0], user).await;
    }
    // Every access token has expired: each user's first caller refreshes.
    tokio::time::sleep(Duration::from_secs(ACCESS_TTL + 1)).await;
    let before = idp_refreshes(&idp).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(CALLERS).build().unwrap();
    let started = Instant::now();
    let calls = (0..CALLERS).map(|i| get_tokens(&client, &replicas[i % replicas_n], &users[i % USERS]));
    let answers = futures::future::join_all(calls).await;
    let wall = started.elapsed();
    let errors = answers.iter().filter(|ok| !**ok).count();
    let refreshes = idp_refreshes(&idp).await - before;
    let (sum, count) = idp_latency(&replicas).await;
    let latency = if count > 0.0 { sum / count * 1000.0 } else { f64::NAN };
    let peaks: Vec<String> = replicas.iter().map(|r| format!("{:.1}", r.peak_mb())).collect();
    let (rps, p99) = hot_path(&replicas, &users).await;
    println!(
        "| {name} | {refreshes} | {errors} | {:.0} | {latency:.0} | {} | {rps:.0} | {p99:.2} |",
        wall.as_secs_f64() * 1000.0,
        peaks.join(" / ")
    );
    drop(replicas);
    let _ = idp.child.kill();
}

/// tokenhub with `n` lineages in a SQLite vault: start time and memory.
async fn vault_of(bin: &str, n: usize) {
    use tokenhub::vault::store::Store;
    use tokenhub::vault::{TokenSet, Vault};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("vault.sqlite").display());
    let idp = start_idp(&["http://127.0.0.1:1/callback".into()]);
    {
        let store = Store::connect(&url).await.unwrap();
        let vault = Vault::new(store, Arc::new(tokenhub::vault::crypto::KeyRing::parse(CRYPT_KEY).unwrap()));
        let claims = json!({"preferred_username": "x"}).as_object().unwrap().clone();
        for i in 0..n {
            let user = format!("user{i:06}");
            let tokens = TokenSet {
                access_token: format!("access-{user}-{}", "a".repeat(800)).into(),
                id_token: format!("id-{user}-{}", "i".repeat(900)).into(),
                refresh_token: Some(format!("refresh-{user}-{}", "r".repeat(400)).into()),
                access_expires_at: Some(tokenhub::time::now() + 3600),
                scope: "openid email profile offline_access".into(),
                fabric: None,
            };
            vault.save_login(&user, &idp.issuer, &format!("sub-{user}"), &tokens, &claims, "n").await.unwrap();
        }
    }
    let hub = stub_hub().await;
    let (replica, start) = Replica::start(bin, free_port(), &idp, hub, &url).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = replica.rss_mb();
    // The operator's listing and the metrics' count read the whole vault.
    let _ = reqwest::get(format!("{}/metrics", replica.url)).await;
    let mut client_calls = 0;
    let client = reqwest::Client::new();
    for i in (0..n).step_by((n / 200).max(1)) {
        client_calls += get_tokens(&client, &replica, &format!("user{i:06}")).await as usize;
    }
    let file_mb = std::fs::metadata(dir.path().join("vault.sqlite")).map_or(0.0, |m| m.len() as f64 / 1048576.0);
    println!(
        "| {n} | {:.0} | {idle:.1} | {:.1} | {file_mb:.1} | {client_calls} |",
        start.as_secs_f64() * 1000.0,
        replica.peak_mb()
    );
    drop(replica);
    let mut idp = idp;
    let _ = idp.child.kill();
}

fn main() {
    let bin =
        std::env::var("TOKENHUB_BIN").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/tokenhub").into());
    let postgres = std::env::var("STORM_POSTGRES_URL").ok();
    let sizes: Vec<usize> = std::env::var("STORM_LINEAGES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        println!("{CALLERS} callers at once across {USERS} users whose access tokens all need a refresh\n");
        println!("| vault, replicas | refreshes at the IdP | errors | storm wall ms | IdP refresh ms (mean) | peak RSS MB | hot path req/s (64 conn) | hot path p99 ms |");
        println!("|---|---:|---:|---:|---:|---|---:|---:|");
        let dir = tempfile::tempdir().unwrap();
        storm("SQLite, 1", &bin, 1, &format!("sqlite://{}?mode=rwc", dir.path().join("storm.sqlite").display())).await;
        let mut databases = HashMap::new();
        if let Some(server) = &postgres {
            for name in ["storm_one", "storm_two"] {
                use sqlx::Connection as _;
                let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres")).await.unwrap();
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&mut admin).await.unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.unwrap();
                databases.insert(name, format!("{server}/{name}"));
            }
            storm("PostgreSQL, 1", &bin, 1, &databases["storm_one"]).await;
            storm("PostgreSQL, 2", &bin, 2, &databases["storm_two"]).await;
        } else {
            println!("(STORM_POSTGRES_URL unset: PostgreSQL rows skipped)");
        }
        println!("\n| lineages in the vault | start ms (to ready) | RSS idle MB | peak RSS MB | SQLite file MB | tokens served (sample) |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for n in sizes {
            vault_of(&bin, n).await;
        }
    });
}
