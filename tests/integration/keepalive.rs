//! Keep-alive: the real oidc-provider with refresh tokens that die after a
//! few seconds unused (each refresh issues a new one, so the lifetime acts as
//! an idle timeout); the hub mocked, saying who runs a server.

use std::time::Duration;

use secrecy::ExposeSecret;
use tokenhub::tokens::keepalive::KeepAlive;
use tokenhub::tokens::refresh::{RefreshError, Want};

use crate::support::*;

/// tokenhub with keep-alive every second, going by an idle timeout of
/// `idle` seconds (refreshing at most `idle / 2` before its end).
async fn app(idp: &Idp, hub: &HubMock, idle: Option<u64>, database: Option<String>) -> TestApp {
    let proxy = url::Url::parse(&hub.server.uri()).unwrap();
    let mut builder = TestApp::builder(&idp.issuer).hub(hub).settings(|s| {
        s.hub_url = Some(proxy);
        s.keepalive_interval = Some(1);
        s.keepalive_idle_timeout = idle;
        s.keepalive_margin = Some(idle.unwrap_or(6) / 2);
    });
    if let Some(url) = database {
        builder = builder.database(url);
    }
    builder.spawn().await
}

async fn login(app: &TestApp, idp: &Idp, user: &str) {
    let (code, login) = Hub::login_at(app, idp, &Browser::new(), user).await;
    assert_eq!(Hub::exchange_code(app, &code, &login).await.status(), reqwest::StatusCode::OK);
}

async fn lineage(app: &TestApp, idp: &Idp, user: &str) -> tokenhub::vault::Lineage {
    app.state().vault.load(user, &idp.issuer).await.unwrap().unwrap()
}

fn keepalive_refreshes(app: &TestApp) -> u64 {
    app.state().metrics.keepalive.refreshes.get()
}

fn keepalive_failures(app: &TestApp) -> u64 {
    app.state().metrics.keepalive.failures_total()
}

/// A forced refresh through tokenhub: the IdP takes the stored refresh token.
async fn refresh_now(app: &TestApp, user: &str) -> Result<tokenhub::tokens::refresh::Fresh, RefreshError> {
    app.state().refresher.fresh(app.state(), user, Want { min_valid: None, force: true }).await
}

#[tokio::test]
async fn a_running_server_keeps_the_lineage_alive_and_an_idle_user_is_let_go() {
    let idp = Idp::start(&[("IDP_REFRESH_TOKEN_TTL", "10")]);
    let hub = HubMock::start().await;
    let app = app(&idp, &hub, Some(10), None).await;
    login(&app, &idp, "alice").await;
    login(&app, &idp, "bob").await;
    hub.running(&app, "alice").await;
    let first_file_at = lineage(&app, &idp, "alice").await.updated_at;
    let keepalive = KeepAlive::start(app.state().clone()).expect("keep-alive runs");

    // Three idle periods, nobody touching either user's tokens.
    tokio::time::sleep(Duration::from_secs(31)).await;
    keepalive.stop().await;

    let alice = lineage(&app, &idp, "alice").await;
    assert!(alice.active);
    assert!(alice.refreshed_at.is_some_and(|at| at > first_file_at), "keep-alive refreshed alice");
    let refreshes = idp.refreshes("alice").await;
    assert!((3..=14).contains(&refreshes), "{refreshes} refreshes in 31 s of a 10 s idle timeout");
    assert_eq!(keepalive_refreshes(&app), refreshes, "each one made by keep-alive");
    assert_eq!(alice.version as u64, 1 + refreshes);
    assert_eq!(idp.refreshes("bob").await, 0, "bob runs no server: not kept alive");

    // The token file in alice's server holds the current tokens and moved on.
    let vault_refresh = alice.tokens.refresh_token.as_ref().unwrap().expose_secret().to_string();
    wait_until(Duration::from_secs(5), "the last token file holds the current refresh token", async || {
        hub.token_files("alice").await.last().is_some_and(|f| f["refresh_token"] == vault_refresh.as_str())
    })
    .await;
    let files = hub.token_files("alice").await;
    assert!(files.len() as u64 >= refreshes, "a file written after every refresh");
    assert_ne!(files.first().unwrap()["created_at"], files.last().unwrap()["created_at"]);
    assert_eq!(files.last().unwrap()["state"], "Refreshed");

    // The IdP still takes alice's refresh token; bob's died unused.
    let fresh = refresh_now(&app, "alice").await.expect("alice's lineage is alive");
    assert!(fresh.refreshed);
    assert!(matches!(refresh_now(&app, "bob").await, Err(RefreshError::Dead(_))), "bob's refresh token died");

    let metrics = reqwest::get(app.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("tokenhub_keepalive_refreshes_total {refreshes}")), "{metrics}");
    for cause in ["idp_unreachable", "idp_error", "refused", "busy", "misconfigured", "vault"] {
        assert!(metrics.contains(&format!("tokenhub_keepalive_failures_total{{cause=\"{cause}\"}} 0")), "{metrics}");
    }
    assert!(metrics.contains("tokenhub_keepalive_rounds_total "), "{metrics}");
    let logs = logs();
    assert!(logs.contains("keep-alive refreshed the user's tokens"));
    assert!(!logs.contains(&vault_refresh), "no token value in the logs");
}

#[tokio::test]
async fn the_idps_refresh_expires_in_is_stored_and_kept_to() {
    let idp = Idp::start(&[("IDP_REFRESH_TOKEN_TTL", "10"), ("IDP_SEND_REFRESH_EXPIRES_IN", "1")]);
    let hub = HubMock::start().await;
    // No idle timeout is configured: only the IdP's word says when to refresh.
    let app = app(&idp, &hub, None, None).await;
    login(&app, &idp, "erin").await;
    hub.running(&app, "erin").await;
    let rows = app.sql("SELECT refresh_expires_at - updated_at AS ttl FROM lineages WHERE username = 'erin'").await;
    let ttl: i64 = sqlx::Row::get(&rows[0], "ttl");
    assert!((9..=11).contains(&ttl), "refresh_expires_at stored from refresh_expires_in: {ttl}");

    let keepalive = KeepAlive::start(app.state().clone()).expect("keep-alive runs");
    tokio::time::sleep(Duration::from_secs(21)).await;
    keepalive.stop().await;
    let refreshes = idp.refreshes("erin").await;
    assert!(refreshes >= 2, "{refreshes} refreshes in 21 s of a 10 s lifetime");
    let rows = app.sql("SELECT refresh_expires_at - refreshed_at AS ttl FROM lineages WHERE username = 'erin'").await;
    let ttl: i64 = sqlx::Row::get(&rows[0], "ttl");
    assert!((9..=11).contains(&ttl), "each refresh stores the new lifetime: {ttl}");
    refresh_now(&app, "erin").await.expect("erin's lineage is alive");
}

#[tokio::test]
async fn two_replicas_refresh_each_lineage_once_per_period() {
    let idp = Idp::start(&[("IDP_REFRESH_TOKEN_TTL", "10")]);
    let hub = HubMock::start().await;
    let database = Postgres::shared().new_database().await;
    let a = app(&idp, &hub, Some(10), Some(database.clone())).await;
    let b = app(&idp, &hub, Some(10), Some(database)).await;
    for user in ["carol", "chen"] {
        login(&a, &idp, user).await;
        hub.running(&a, user).await;
    }
    let keepalive_a = KeepAlive::start(a.state().clone()).unwrap();
    let keepalive_b = KeepAlive::start(b.state().clone()).unwrap();
    tokio::time::sleep(Duration::from_secs(21)).await;
    keepalive_a.stop().await;
    keepalive_b.stop().await;

    let mut total = 0;
    for user in ["carol", "chen"] {
        let refreshes = idp.refreshes(user).await;
        let lineage = lineage(&b, &idp, user).await;
        assert!(lineage.active, "{user}: a double refresh would have spent a rotated token");
        // Refreshes come 2.5–5 s apart (idle 10 s, margin 5 s): one replica
        // alone makes 4–8 of them in 21 s; both, refreshing each, twice that
        // (and then the versions below would not match the IdP's count).
        assert!((2..=10).contains(&refreshes), "{user}: {refreshes} refreshes in 21 s");
        assert_eq!(lineage.version as u64, 1 + refreshes, "{user}: every IdP refresh is one stored version");
        total += refreshes;
    }
    assert_eq!(idp.stats().await["refresh_token_error"], 0);
    assert!(keepalive_refreshes(&a) > 0 || keepalive_refreshes(&b) > 0);
    assert!(keepalive_refreshes(&a) + keepalive_refreshes(&b) >= total);
}

#[tokio::test]
async fn an_idp_outage_during_a_round_kills_no_lineage_and_keep_alive_resumes() {
    let idp = Idp::start(&[("IDP_REFRESH_TOKEN_TTL", "16")]);
    let hub = HubMock::start().await;
    let app = app(&idp, &hub, Some(16), None).await;
    login(&app, &idp, "dana").await;
    hub.running(&app, "dana").await;
    let keepalive = KeepAlive::start(app.state().clone()).unwrap();
    wait_until(Duration::from_secs(12), "keep-alive refreshed once", async || keepalive_refreshes(&app) == 1).await;

    // The IdP goes away; keep-alive's next refresh finds it gone.
    idp.stop();
    wait_until(Duration::from_secs(12), "a keep-alive refresh failed", async || keepalive_failures(&app) >= 1).await;
    let during = lineage(&app, &idp, "dana").await;
    assert!(during.active, "an outage marks no lineage dead");
    assert_eq!(during.version, 2);

    // The IdP is back (same state): keep-alive resumes before the token dies.
    idp.restart(&[("IDP_REFRESH_TOKEN_TTL", "16")]);
    wait_until(Duration::from_secs(10), "keep-alive refreshed again", async || keepalive_refreshes(&app) >= 2).await;
    keepalive.stop().await;
    let after = lineage(&app, &idp, "dana").await;
    assert!(after.active);
    assert!(after.version > 2);
    refresh_now(&app, "dana").await.expect("dana's lineage is alive");
    assert!(logs().contains("keep-alive round ended early"));
}

#[tokio::test]
async fn replicas_deciding_at_the_same_moment_refresh_once() {
    use sqlx::Connection;
    let idp = Idp::start(&[]);
    let hub = HubMock::start().await;
    let database = Postgres::shared().new_database().await;
    // An idle timeout of 60 s, refreshed 15–30 s before its end.
    let a = app(&idp, &hub, Some(60), Some(database.clone())).await;
    let b = app(&idp, &hub, Some(60), Some(database.clone())).await;
    login(&a, &idp, "fay").await;
    hub.running(&a, "fay").await;
    let mut db = sqlx::PgConnection::connect(&database).await.unwrap();
    for round in 1..=3 {
        // The lineage was last refreshed 40 s ago: due on both replicas.
        sqlx::query(
            "UPDATE lineages SET created_at = created_at - 40, refreshed_at = refreshed_at - 40, \
             refresh_expires_at = NULL WHERE username = 'fay'",
        )
        .execute(&mut db)
        .await
        .unwrap();
        // Both replicas run a round at once: both see the lineage due.
        let (ra, rb) =
            tokio::join!(tokenhub::tokens::keepalive::round_once(a.state()), tokenhub::tokens::keepalive::round_once(b.state()));
        ra.unwrap();
        rb.unwrap();
        assert_eq!(idp.refreshes("fay").await, round, "one refresh per due point, not one per replica");
        let lineage = lineage(&a, &idp, "fay").await;
        assert!(lineage.active);
        assert_eq!(lineage.version as u64, 1 + round);
    }
    assert_eq!(keepalive_refreshes(&a) + keepalive_refreshes(&b), 3);

    // A replica that decided on version 3 while another stored version 4
    // (the moment between reading the row and refreshing) shares that
    // refresh instead of making its own, even with a fresh cache.
    b.state().vault.forget("fay", &idp.issuer);
    let want = Want { min_valid: None, force: true };
    let (fresh, made) = b.state().refresher.fresh_since(b.state(), "fay", want, 3).await.unwrap();
    assert!(!made, "the lineage had moved past the version decided on");
    assert_eq!(fresh.lineage.version, 4);
    assert_eq!(idp.refreshes("fay").await, 3);
    refresh_now(&b, "fay").await.expect("fay's lineage is alive");
}

#[tokio::test]
async fn fresh_access_keeps_the_access_token_in_the_file_valid() {
    // Refresh tokens live long here; access tokens 10 s.
    let idp = Idp::start(&[("IDP_ACCESS_TOKEN_TTL", "10")]);
    let hub = HubMock::start().await;
    let proxy = url::Url::parse(&hub.server.uri()).unwrap();
    let app = TestApp::builder(&idp.issuer)
        .hub(&hub)
        .settings(|s| {
            s.hub_url = Some(proxy);
            s.keepalive_interval = Some(1);
            s.keepalive_margin = Some(5);
            s.keepalive_fresh_access = Some(true);
        })
        .spawn()
        .await;
    login(&app, &idp, "gus").await;
    login(&app, &idp, "hal").await;
    hub.running(&app, "gus").await;
    let keepalive = KeepAlive::start(app.state().clone()).unwrap();
    tokio::time::sleep(Duration::from_secs(15)).await;
    keepalive.stop().await;
    let refreshes = idp.refreshes("gus").await;
    assert!((2..=8).contains(&refreshes), "{refreshes} refreshes in 15 s of 10 s access tokens");
    let gus = lineage(&app, &idp, "gus").await;
    assert!(gus.tokens.access_expires_at.unwrap() > tokenhub::time::now(), "the access token is still valid");
    assert_eq!(idp.refreshes("hal").await, 0, "hal runs no server");
}

#[tokio::test]
async fn keep_alive_stops_with_the_server_unless_a_grace_period_is_set() {
    let idp = Idp::start(&[("IDP_REFRESH_TOKEN_TTL", "10")]);
    let (hub, hub_with_grace) = (HubMock::start().await, HubMock::start().await);
    let app = app(&idp, &hub, Some(10), None).await;
    let proxy = url::Url::parse(&hub_with_grace.server.uri()).unwrap();
    let with_grace = TestApp::builder(&idp.issuer)
        .hub(&hub_with_grace)
        .settings(|s| {
            s.hub_url = Some(proxy);
            s.keepalive_interval = Some(1);
            s.keepalive_idle_timeout = Some(10);
            s.keepalive_margin = Some(5);
            s.keepalive_grace = Some(60);
        })
        .spawn()
        .await;
    login(&app, &idp, "ivy").await;
    login(&with_grace, &idp, "jon").await;
    hub.running(&app, "ivy").await;
    hub_with_grace.running(&with_grace, "jon").await;
    let keepalives = [KeepAlive::start(app.state().clone()).unwrap(), KeepAlive::start(with_grace.state().clone()).unwrap()];
    wait_until(Duration::from_secs(14), "both were kept alive once", async || {
        keepalive_refreshes(&app) >= 1 && keepalive_refreshes(&with_grace) >= 1
    })
    .await;

    // Both servers stop (the hub forgets them).
    hub.server.reset().await;
    hub_with_grace.server.reset().await;
    let (ivy, jon) = (idp.refreshes("ivy").await, idp.refreshes("jon").await);
    tokio::time::sleep(Duration::from_secs(15)).await;
    for keepalive in keepalives {
        keepalive.stop().await;
    }
    // (One refresh may have been under way when the server stopped.)
    assert!(idp.refreshes("ivy").await <= ivy + 1, "no server, no grace: keep-alive stopped");
    assert!(idp.refreshes("jon").await >= jon + 2, "within the grace period keep-alive goes on");
}
