//! The operator's view: `GET /api/v1/admin/lineages` and the `/admin` page
//! with its revoke button, for hub admins only (the hub's word, mocked by
//! `HubMock`; logins go through the shared oidc-provider).

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokenhub::vault::TokenSet;

use crate::support::*;

/// A token the hub knows for `user`, allowed to call tokenhub, whose
/// `/hub/api/user` answer says `admin` and lists `extra` scopes too.
async fn hub_token(hub: &HubMock, user: &str, admin: bool, extra: &[&str]) -> String {
    use wiremock::matchers::{header, method, path};
    let token = format!("admin-test-token-{user}-{}", tokenhub::vault::crypto::random_token());
    let mut scopes = vec!["access:services!service=tokenhub", "read:users:name!user"];
    scopes.extend_from_slice(extra);
    wiremock::Mock::given(method("GET"))
        .and(path("/hub/api/user"))
        .and(header("authorization", format!("token {token}").as_str()))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "kind": "user", "name": user, "admin": admin, "servers": {}, "scopes": scopes
        })))
        .mount(&hub.server)
        .await;
    token
}

/// The hub's `GET /hub/api/users/{user}` (tokenhub's own token) says `admin`.
async fn hub_user(hub: &HubMock, user: &str, admin: bool) {
    use wiremock::matchers::{method, path};
    wiremock::Mock::given(method("GET"))
        .and(path(format!("/hub/api/users/{user}")))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "kind": "user", "name": user, "admin": admin, "servers": {}
        })))
        .mount(&hub.server)
        .await;
}

fn tokens(seed: &str) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(format!("secret-access-{seed}")),
        id_token: SecretString::from(format!("secret-id-{seed}")),
        refresh_token: Some(SecretString::from(format!("secret-refresh-{seed}"))),
        access_expires_at: Some(tokenhub::time::now() + 3600),
        scope: "openid offline_access".into(),
        fabric: None,
    }
}

async fn save(app: &TestApp, user: &str) {
    let issuer = app.state().upstream.issuer().to_string();
    app.state()
        .vault
        .save_login(user, &issuer, &format!("sub-{user}"), &tokens(user), &serde_json::Map::new(), "nonce")
        .await
        .unwrap();
}

async fn list(app: &TestApp, token: &str, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(app.url(&format!("/api/v1/admin/lineages?{query}")))
        .header("authorization", format!("token {token}"))
        .send()
        .await
        .unwrap()
}

async fn list_ok(app: &TestApp, token: &str, query: &str) -> Value {
    let response = list(app, token, query).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let text = response.text().await.unwrap();
    assert!(!text.contains("secret-"), "a token value is in the admin JSON: {text}");
    serde_json::from_str(&text).unwrap()
}

fn users(page: &Value) -> Vec<String> {
    page["lineages"].as_array().unwrap().iter().map(|l| l["user"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn admin_json_lists_states_filters_sorts_and_pages() {
    let hub = HubMock::start().await;
    let app = TestApp::builder(&Idp::shared().issuer).hub(&hub).spawn().await;
    let issuer = app.state().upstream.issuer().to_string();
    save(&app, "alive").await;
    save(&app, "gone").await;
    let version = app.state().vault.load("gone", &issuer).await.unwrap().unwrap().version;
    assert!(
        app.state()
            .vault
            .mark_dead("gone", &issuer, version, "the identity provider refused the refresh: invalid_grant (test)")
            .await
            .unwrap()
    );

    let admin = hub_token(&hub, "boss", true, &[]).await;
    let page = list_ok(&app, &admin, "").await;
    assert_eq!(page["total"], 2);
    assert_eq!(users(&page), ["alive", "gone"]);
    let alive = &page["lineages"][0];
    assert_eq!(alive["state"], "active");
    assert_eq!(alive["issuer"], issuer.as_str());
    assert_eq!(alive["subject"], "sub-alive");
    assert_eq!(alive["has_refresh_token"], true);
    assert!(alive["access_expires_at"].as_i64().is_some());
    assert!(alive["dead_reason"].is_null());
    // Default settings: keep-alive runs but knows no idle timeout.
    assert!(alive["keepalive"].as_str().unwrap().starts_with("idle"), "{alive}");
    for key in ["refresh_expires_at", "last_refresh", "version", "created_at", "servers"] {
        assert!(alive.get(key).is_some(), "{key} missing: {alive}");
    }
    let gone = &page["lineages"][1];
    assert_eq!(gone["state"], "dead");
    assert!(gone["dead_reason"].as_str().unwrap().contains("invalid_grant"));
    assert!(gone["keepalive"].as_str().unwrap().starts_with("none"), "{gone}");
    assert_eq!(users(&list_ok(&app, &admin, "state=dead").await), ["gone"]);
    assert_eq!(users(&list_ok(&app, &admin, "state=active").await), ["alive"]);

    // A token holding tokenhub's custom admin scope is an operator too,
    // though its user is no hub admin.
    let scoped = hub_token(&hub, "ops", false, &["custom:tokenhub:admin"]).await;
    assert_eq!(list_ok(&app, &scoped, "").await["total"], 2);

    // 30 more users, paged 10 at a time by prefix: each once, in order.
    for i in 0..30 {
        save(&app, &format!("bulk-{i:02}")).await;
    }
    let mut seen = Vec::new();
    let mut offset = Some(0);
    let mut pages = 0;
    while let Some(at) = offset {
        let page = list_ok(&app, &admin, &format!("user=bulk-&limit=10&offset={at}")).await;
        assert_eq!(page["total"], 30);
        let batch = users(&page);
        assert_eq!(batch.len(), 10);
        seen.extend(batch);
        offset = page["next_offset"].as_i64();
        pages += 1;
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..30).map(|i| format!("bulk-{i:02}")).collect();
    assert_eq!(seen, expected);
    let descending = list_ok(&app, &admin, "user=bulk-&sort=user&order=desc&limit=3").await;
    assert_eq!(users(&descending), ["bulk-29", "bulk-28", "bulk-27"]);
    assert_eq!(descending["next_offset"], 3);
    // Never refreshed sorts last either way; the rest by their time.
    app.sql("UPDATE lineages SET refreshed_at = 100 WHERE username = 'bulk-05'").await;
    app.sql("UPDATE lineages SET refreshed_at = 200 WHERE username = 'bulk-17'").await;
    let by_refresh = list_ok(&app, &admin, "user=bulk-&sort=last_refresh&order=desc&limit=3").await;
    assert_eq!(users(&by_refresh), ["bulk-17", "bulk-05", "bulk-00"]);
    assert_eq!(by_refresh["lineages"][0]["last_refresh"], 200);
    let by_expiry = list_ok(&app, &admin, "sort=access_expires&limit=500").await;
    assert_eq!(by_expiry["lineages"].as_array().unwrap().len(), 32);

    // Precise 400s for bad parameters.
    for query in ["limit=0", "limit=501", "offset=-1", "state=zombie", "sort=subject", "order=sideways"] {
        let body = assert_json_error(list(&app, &admin, query).await, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(!body.to_string().contains("secret-"));
    }
    // A non-admin's token (allowed to call tokenhub) gets 403; no token, 401.
    let plain = hub_token(&hub, "alive", false, &[]).await;
    assert_json_error(list(&app, &plain, "").await, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert_json_error(list(&app, &plain, "limit=0").await, StatusCode::FORBIDDEN, "insufficient_scope").await;
    let anonymous = reqwest::get(app.url("/api/v1/admin/lineages")).await.unwrap();
    assert_json_error(anonymous, StatusCode::UNAUTHORIZED, "invalid_token").await;
}

#[tokio::test]
async fn admin_page_lists_users_and_revokes_one() {
    let hub = HubMock::start().await;
    let app = TestApp::builder(&Idp::shared().issuer).hub(&hub).spawn().await;
    let issuer = Idp::shared().issuer.clone();
    let (admin, user) = ("adm-olga", "adm-pete");
    hub_user(&hub, admin, true).await;
    hub_user(&hub, user, false).await;
    let admin_browser = Browser::new();
    Hub::login(&app, &admin_browser, admin).await;
    let user_browser = Browser::new();
    Hub::login(&app, &user_browser, user).await;
    let server_token = hub.server_token(user).await;
    let fetch =
        || reqwest::Client::new().get(app.url("/api/v1/tokens")).header("authorization", format!("token {server_token}")).send();
    assert_eq!(fetch().await.unwrap().status(), StatusCode::OK);

    // The non-admin gets 403 on the page and on the JSON.
    assert_error_page(user_browser.get(app.url("/admin")).await, StatusCode::FORBIDDEN).await;
    assert_json_error(list(&app, &server_token, "").await, StatusCode::FORBIDDEN, "insufficient_scope").await;
    // No session: 401 page; not a top-level navigation: 403.
    assert_error_page(Browser::new().get(app.url("/admin")).await, StatusCode::UNAUTHORIZED).await;
    let fetched = admin_browser
        .http
        .get(app.url("/admin"))
        .header("sec-fetch-mode", "cors")
        .header("sec-fetch-dest", "empty")
        .send()
        .await
        .unwrap();
    assert_error_page(fetched, StatusCode::FORBIDDEN).await;

    let page = html(admin_browser.get(app.url("/admin")).await).await;
    assert!(page.contains(&format!("data-user=\"{admin}\"")), "{page}");
    assert!(page.contains(&format!("data-user=\"{user}\"")), "{page}");
    assert!(page.contains("of 2 lineages"), "{page}");
    assert!(page.contains(&issuer));
    for who in [admin, user] {
        let lineage = app.state().vault.load(who, &issuer).await.unwrap().unwrap();
        for secret in [
            lineage.tokens.access_token.expose_secret(),
            lineage.tokens.id_token.expose_secret(),
            lineage.tokens.refresh_token.as_ref().unwrap().expose_secret(),
        ] {
            assert!(!page.contains(secret), "a token value is in the admin page");
        }
    }
    // Filter by prefix, sort links.
    let filtered = html(admin_browser.get(app.url("/admin?user=adm-p")).await).await;
    assert!(filtered.contains(&format!("data-user=\"{user}\"")) && !filtered.contains(&format!("data-user=\"{admin}\"")));
    assert!(page.contains("sort=last_refresh"));
    assert_error_page(admin_browser.get(app.url("/admin?limit=9999")).await, StatusCode::BAD_REQUEST).await;

    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let origin = origin_of(&app);
    let post = |origin: Option<&str>, csrf: &str| {
        let mut request = admin_browser.http.post(app.url("/admin/revoke")).form(&[("csrf", csrf), ("user", user)]);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    // Forged: wrong CSRF value, another origin, no origin; the non-admin's own CSRF.
    for (o, c) in [(Some(origin.as_str()), "guess"), (Some("http://evil.example"), csrf.as_str()), (None, csrf.as_str())] {
        let body = assert_error_page(post(o, c).await.unwrap(), StatusCode::FORBIDDEN).await;
        assert!(!body.contains(&csrf));
    }
    let user_page = html(user_browser.get(app.url("/")).await).await;
    let user_csrf = user_page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let by_user = user_browser
        .http
        .post(app.url("/admin/revoke"))
        .header("origin", &origin)
        .form(&[("csrf", user_csrf.as_str()), ("user", admin)])
        .send()
        .await
        .unwrap();
    assert_error_page(by_user, StatusCode::FORBIDDEN).await;
    assert!(app.state().vault.load(user, &issuer).await.unwrap().is_some());
    assert!(app.state().vault.load(admin, &issuer).await.unwrap().is_some());

    let done = html(post(Some(origin.as_str()), &csrf).await.unwrap()).await;
    assert!(done.contains("revoked the refresh token"), "{done}");
    assert!(app.state().vault.load(user, &issuer).await.unwrap().is_none());
    assert!(logs().contains("admin_revoke") && logs().contains(&format!("revoked by admin {admin}")));

    // The user's notebook now meets invalid_grant with the way back.
    let body = assert_json_error(fetch().await.unwrap(), StatusCode::UNAUTHORIZED, "invalid_grant").await;
    assert!(body["reauth_url"].as_str().unwrap().ends_with("/refresh"), "{body}");
    let page = html(admin_browser.get(app.url("/admin")).await).await;
    assert!(page.contains("of 1 lineages") && !page.contains(&format!("data-user=\"{user}\"")), "{page}");
    // Revoking again: nothing left to revoke.
    assert_error_page(post(Some(origin.as_str()), &csrf).await.unwrap(), StatusCode::NOT_FOUND).await;
}

/// The listing's SQL on PostgreSQL (whose NULL order and typing differ
/// from SQLite's): filters, sort with unknown times last, paging.
#[tokio::test]
async fn admin_listing_on_postgres() {
    let hub = HubMock::start().await;
    let database = Postgres::shared().new_database().await;
    let app = TestApp::builder(&Idp::shared().issuer).hub(&hub).database(database).spawn().await;
    let issuer = app.state().upstream.issuer().to_string();
    for user in ["pg-a", "pg-b", "pg-c", "other"] {
        save(&app, user).await;
    }
    let version = app.state().vault.load("pg-b", &issuer).await.unwrap().unwrap().version;
    assert!(
        app.state()
            .vault
            .mark_dead("pg-b", &issuer, version, "the identity provider refused the refresh: invalid_grant (test)")
            .await
            .unwrap()
    );
    let admin = hub_token(&hub, "boss", true, &[]).await;
    let all = list_ok(&app, &admin, "user=pg-").await;
    assert_eq!(users(&all), ["pg-a", "pg-b", "pg-c"]);
    assert_eq!(users(&list_ok(&app, &admin, "user=pg-&state=dead").await), ["pg-b"]);
    assert_eq!(users(&list_ok(&app, &admin, "state=active&order=desc&limit=2").await), ["pg-c", "pg-a"]);
    let page = list_ok(&app, &admin, "state=active&order=desc&limit=2&offset=2").await;
    assert_eq!(
        (users(&page), page["next_offset"].clone(), page["total"].clone()),
        (vec!["other".to_string()], Value::Null, Value::from(3))
    );
    // No lineage was refreshed: all sort by user after the (equal) unknown times.
    assert_eq!(users(&list_ok(&app, &admin, "sort=last_refresh&order=desc").await), ["other", "pg-a", "pg-b", "pg-c"]);
}
