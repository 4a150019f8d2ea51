//! Keep-alive and the refresher through outages, against the real
//! oidc-provider with refresh tokens that die after 20 s unused: a key
//! rollover with the key set down or hanging, the IdP gone for most of the
//! margin, a slow key set seen from two replicas, and a replica killed
//! (SIGKILL, the real binary) while it holds a lineage's lease.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokenhub::tokens::keepalive::KeepAlive;
use tokenhub::tokens::refresh::Want;

use crate::refresh_safety::Caller;
use crate::support::*;

/// Refresh tokens die after this long unused (each refresh makes a new one).
const REFRESH_TTL: &str = "20";

/// tokenhub with keep-alive every second, refreshing 10–15 s before a
/// refresh token's idle end.
async fn keeping_alive(idp: &Idp, hub: &HubMock) -> TestApp {
    let proxy = url::Url::parse(&hub.server.uri()).unwrap();
    TestApp::builder(&idp.issuer)
        .hub(hub)
        .settings(|s| {
            s.hub_url = Some(proxy);
            s.keepalive_interval = Some(1);
            s.keepalive_idle_timeout = Some(20);
            s.keepalive_margin = Some(10);
        })
        .spawn()
        .await
}

async fn log_in(app: &TestApp, idp: &Idp, user: &str) {
    let (code, login) = Hub::login_at(app, idp, &Browser::new(), user).await;
    assert_eq!(Hub::exchange_code(app, &code, &login).await.status(), StatusCode::OK);
}

/// `n` users signed in, each running a server, nobody calling.
async fn idle_users(app: &TestApp, idp: &Idp, hub: &HubMock, n: usize) -> Vec<String> {
    let users: Vec<String> = (0..n).map(|i| format!("idle{i:02}")).collect();
    for user in &users {
        log_in(app, idp, user).await;
        hub.running(app, user).await;
    }
    users
}

async fn lineage(app: &TestApp, idp: &Idp, user: &str) -> tokenhub::vault::Lineage {
    app.state().vault.load(user, &idp.issuer).await.unwrap().unwrap()
}

/// Every user's lineage is active and its refresh token still works at the IdP.
async fn all_alive(app: &TestApp, idp: &Idp, users: &[String]) {
    let mut dead = Vec::new();
    for user in users {
        let before = lineage(app, idp, user).await;
        let works = app.state().refresher.fresh(app.state(), user, Want { min_valid: None, force: true }).await.is_ok();
        if !before.active || !works {
            dead.push(user.clone());
        }
    }
    assert!(dead.is_empty(), "{} of {} lineages died: {dead:?}", dead.len(), users.len());
}

async fn jwks_failed(idp: &Idp) -> u64 {
    idp.stats().await["jwks_failed"].as_u64().unwrap_or(0)
}

/// A signing-key rollover with the key set down for 14 s (longer than half
/// the refresh token's life), ID tokens living 4 s (so the last verified
/// one has expired): keep-alive's refreshes are stored, the unverifiable
/// ID tokens wait, and no idle lineage dies.
async fn key_set_outage_kills_no_idle_lineage(hang: bool) {
    let ttl = [("IDP_REFRESH_TOKEN_TTL", REFRESH_TTL), ("IDP_ACCESS_TOKEN_TTL", "4")];
    let idp = Idp::start(&ttl);
    let hub = HubMock::start().await;
    let app = keeping_alive(&idp, &hub).await;
    let users = idle_users(&app, &idp, &hub, 30).await;
    let mut rollover = ttl.to_vec();
    rollover.extend([("IDP_ROLL_KEY", "1"), ("IDP_JWKS_FAIL_SECONDS", "14")]);
    if hang {
        rollover.push(("IDP_JWKS_HANG", "1"));
    }
    idp.restart(&rollover);
    let keepalive = KeepAlive::start(app.state().clone()).expect("keep-alive runs");
    tokio::time::sleep(Duration::from_secs(30)).await;
    keepalive.stop().await;

    assert!(jwks_failed(&idp).await > 0, "the key set was asked for while it was down");
    let figures = &app.state().metrics.keepalive;
    assert!(figures.refreshes.get() >= 30, "{} keep-alive refreshes", figures.refreshes.get());
    assert_eq!(figures.failures_total(), 0, "{:?}", figures.failures());
    all_alive(&app, &idp, &users).await;
    // Once the key set answers, the waiting ID tokens are verified.
    for user in &users {
        assert!(lineage(&app, &idp, user).await.pending_id_token.is_none(), "{user}'s new ID token was settled");
    }
}

#[tokio::test]
async fn a_key_set_answering_503_after_a_rollover_kills_no_idle_lineage() {
    key_set_outage_kills_no_idle_lineage(false).await;
}

#[tokio::test]
async fn a_key_set_hanging_after_a_rollover_kills_no_idle_lineage() {
    key_set_outage_kills_no_idle_lineage(true).await;
}

/// The IdP gone for most of the margin: keep-alive tries the most urgent
/// lineage each interval, and once the IdP is back every due lineage is
/// refreshed within about an interval; none dies.
#[tokio::test]
async fn after_an_idp_outage_every_lineage_is_refreshed_within_an_interval() {
    let ttl = [("IDP_REFRESH_TOKEN_TTL", REFRESH_TTL)];
    let idp = Idp::start(&ttl);
    let hub = HubMock::start().await;
    let app = keeping_alive(&idp, &hub).await;
    let users = idle_users(&app, &idp, &hub, 10).await;
    let first_login = lineage(&app, &idp, &users[0]).await.created_at;
    let keepalive = KeepAlive::start(app.state().clone()).expect("keep-alive runs");
    idp.stop();
    // Due 10–15 s after sign-in, dead 20 s after it: back with 6 s to spare.
    let back_at = first_login + 14;
    tokio::time::sleep(Duration::from_secs((back_at - tokenhub::time::now()).max(0) as u64)).await;
    idp.restart(&ttl);
    let back = Instant::now();
    // When each lineage is first seen refreshed (version 2), polled.
    let mut refreshed: Vec<Duration> = Vec::new();
    let mut pending: Vec<&String> = users.iter().collect();
    while !pending.is_empty() && back.elapsed() < Duration::from_secs(10) {
        let mut left = Vec::new();
        for user in pending {
            if lineage(&app, &idp, user).await.version >= 2 {
                refreshed.push(back.elapsed());
            } else {
                left.push(user);
            }
        }
        pending = left;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keepalive.stop().await;
    assert!(pending.is_empty(), "not refreshed after the outage: {pending:?}");

    let figures = &app.state().metrics.keepalive;
    let unreachable = figures.failures().into_iter().find(|(c, _)| *c == "idp_unreachable").unwrap().1;
    assert!(unreachable >= 3, "keep-alive kept trying during the outage ({unreachable} attempts)");
    // One interval (1 s), polling, and ten refreshes one after another.
    assert!(refreshed[0] <= Duration::from_secs(2), "the first refresh came {:?} after the IdP's return", refreshed[0]);
    assert!(*refreshed.last().unwrap() <= Duration::from_secs(5), "refreshed {refreshed:?} after the IdP's return");
    all_alive(&app, &idp, &users).await;
}

/// Two replicas, a key rollover and a key set that answers after 2 s:
/// whichever replica refreshes, callers of both get their tokens (the one
/// that waited for the other's refresh checks the new ID token too) and
/// the IdP sees one refresh.
#[tokio::test]
async fn two_replicas_with_a_slow_key_set_give_no_caller_503() {
    // The login's access and ID tokens live 3 s; the refreshed ones a minute
    // (callers still queued when 3 s are over would need another refresh).
    let idp = Idp::start(&[("IDP_ACCESS_TOKEN_TTL", "3")]);
    let hub = HubMock::start().await;
    let database = Postgres::shared().new_database().await;
    let a = TestApp::builder(&idp.issuer).hub(&hub).database(database.clone()).spawn().await;
    let b = TestApp::builder(&idp.issuer).hub(&hub).database(database).spawn().await;
    log_in(&a, &idp, "uma").await;
    let (on_a, on_b) = (Caller::new(&a, &hub, "uma").await, Caller::new(&b, &hub, "uma").await);
    assert_eq!(on_b.get("").await.status(), StatusCode::OK);
    // The access token and the login's ID token expire; the key rolls over.
    tokio::time::sleep(Duration::from_secs(4)).await;
    idp.restart(&[("IDP_ACCESS_TOKEN_TTL", "60"), ("IDP_ROLL_KEY", "1"), ("IDP_JWKS_FAIL_SECONDS", "3"), ("IDP_JWKS_HANG", "1")]);

    let started = Instant::now();
    let calls = (0..20).map(|i| if i % 2 == 0 { on_a.get("") } else { on_b.get("") });
    let answers = futures::future::join_all(calls).await;
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?} after {:?}", started.elapsed());
    assert_eq!(idp.refreshes("uma").await, 1, "one refresh across both replicas");
    assert!(jwks_failed(&idp).await > 0, "the key set was slow");
}

/// A replica killed (SIGKILL) while it holds a lineage's lease, its
/// request still at the IdP's slow token endpoint: the other replica takes
/// the lease over and refreshes within a few seconds, and the IdP saw one
/// refresh (the dead replica's request never got through).
#[tokio::test]
async fn a_killed_replicas_lease_is_taken_over_within_seconds() {
    let idp = Idp::start(&[]);
    let hub = HubMock::start().await;
    let b = TestApp::builder(&idp.issuer).hub(&hub).spawn().await;
    let database = format!("sqlite://{}?mode=rwc", b.db_path.display());
    log_in(&b, &idp, "kim").await;
    let before = lineage(&b, &idp, "kim").await;

    // Replica A: the real binary on the same database and hub.
    let port = free_port();
    let mut a = Command::new(env!("CARGO_BIN_EXE_tokenhub"))
        .arg("serve")
        .env_clear()
        .envs(serve_env(&idp.issuer, port, &database))
        .envs([
            ("JUPYTERHUB_API_URL", format!("{}/hub/api", hub.server.uri())),
            ("JUPYTERHUB_API_TOKEN", "tokenhub-service-token".into()),
            ("TOKENHUB_KEEPALIVE_INTERVAL", "0".into()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, "replica A");
    let token = hub.server_token("kim").await;
    let url = format!("http://127.0.0.1:{port}/api/v1/tokens/refresh");
    let client = reqwest::Client::new();
    client.post(format!("{}/_test/token-hold?seconds=60&count=1", idp.issuer)).send().await.unwrap();
    let forced = tokio::spawn(client.post(url).header("authorization", format!("token {token}")).send());

    // A takes the lease and renews it while its request waits at the IdP.
    let lease_until = async || {
        let rows = b.sql("SELECT lease_until FROM lineages WHERE username = 'kim'").await;
        sqlx::Row::get::<Option<i64>, _>(&rows[0], "lease_until")
    };
    wait_until(Duration::from_secs(10), "replica A holds the lease", async || lease_until().await.is_some()).await;
    let first = lease_until().await.unwrap();
    wait_until(Duration::from_secs(5), "replica A renews its lease", async || lease_until().await.is_some_and(|u| u > first))
        .await;

    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    let killed = Instant::now();
    let _ = forced.await;
    let answer = Caller::new(&b, &hub, "kim").await.force().await;
    let took = killed.elapsed();
    assert_eq!(answer.status(), StatusCode::OK, "{}", answer.text().await.unwrap());
    assert!(took < Duration::from_secs(8), "replica B refreshed {took:?} after A died");
    let after = lineage(&b, &idp, "kim").await;
    assert!(after.active);
    assert_eq!(after.version, before.version + 1);
    let stats = idp.stats().await;
    assert_eq!(stats["token_dropped"], 1, "A's request never got through: {stats}");
    assert_eq!(idp.refreshes("kim").await, 1);
}
