//! Who may read a user's tokens (the `access:services!service=…` scope),
//! the negative cache, slowing down repeated failures, the bounded caches,
//! the per-lineage lock map, the audit log and the OpenAPI document.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;

async fn tokens(app: &TestApp, token: &str, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(app.url("/api/v1/tokens")).header("authorization", format!("token {token}"));
    if let Some(ip) = forwarded_for {
        request = request.header("x-forwarded-for", format!("203.0.113.99, {ip}"));
    }
    request.send().await.unwrap()
}

async fn logged_in(hub: &HubMock, user: &str, audit: Option<&std::path::Path>) -> TestApp {
    // The test's requests play the hub's proxy: their `X-Forwarded-For`
    // names the client.
    let mut builder = TestApp::builder(&Idp::shared().issuer).hub(hub).settings(|s| s.trusted_proxies = Some("127.0.0.1".into()));
    if let Some(path) = audit {
        let path = path.display().to_string();
        builder = builder.settings(|s| s.audit_log = Some(path));
    }
    let app = builder.spawn().await;
    let (code, login) = Hub::login(&app, &Browser::new(), user).await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    app
}

#[tokio::test]
async fn only_tokens_with_the_service_scope_read_tokens() {
    let hub = HubMock::start().await;
    let app = logged_in(&hub, "sam", None).await;
    let server = hub.server_token("sam").await;
    let response = tokens(&app, &server, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"], "sam");

    // `access:services` (all services) is as good.
    let broad = hub.token_with("sam", "user", &["access:services"]).await;
    assert_eq!(tokens(&app, &broad, None).await.status(), StatusCode::OK);

    // A narrow personal token, a token for another service, a token the hub
    // issued for sam to another user's server: 403 naming the scope.
    for scopes in [
        &["read:users:activity!user"][..],
        &["access:services!service=other-service"][..],
        &["access:servers!server=alice/", "read:users:name!user=sam"][..],
        &[][..],
    ] {
        let token = hub.token_with("sam", "user", scopes).await;
        let body = assert_json_error(tokens(&app, &token, None).await, StatusCode::FORBIDDEN, "insufficient_scope").await;
        let description = body["error_description"].as_str().unwrap();
        assert!(description.contains("access:services!service=tokenhub"), "{description}");
        assert!(!description.contains(&token));
        assert!(body.get("access_token").is_none());
    }
    // A service's own token names no user: refused.
    let service = hub.token_with("some-service", "service", &["access:services"]).await;
    assert_json_error(tokens(&app, &service, None).await, StatusCode::UNAUTHORIZED, "invalid_token").await;
    // The forced refresh endpoint applies the same rule.
    let narrow = hub.token_with("sam", "user", &["read:users:activity!user"]).await;
    let response = reqwest::Client::new()
        .post(app.url("/api/v1/tokens/refresh"))
        .header("authorization", format!("token {narrow}"))
        .send()
        .await
        .unwrap();
    assert_json_error(response, StatusCode::FORBIDDEN, "insufficient_scope").await;
}

#[tokio::test]
async fn the_service_name_setting_names_the_scope() {
    let hub = HubMock::start().await;
    let app = TestApp::builder(&Idp::shared().issuer).hub(&hub).settings(|s| s.service_name = Some("vault".into())).spawn().await;
    let (code, login) = Hub::login(&app, &Browser::new(), "sid").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    let right = hub.token_with("sid", "user", &["access:services!service=vault"]).await;
    assert_eq!(tokens(&app, &right, None).await.status(), StatusCode::OK);
    let default_name = hub.server_token("sid").await; // holds ...service=tokenhub
    let body = assert_json_error(tokens(&app, &default_name, None).await, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert!(body["error_description"].as_str().unwrap().contains("access:services!service=vault"));
}

#[tokio::test]
async fn unknown_tokens_are_remembered_and_repeated_failures_slowed_down() {
    let hub = HubMock::start().await;
    let app = logged_in(&hub, "ted", None).await;
    let good = hub.server_token("ted").await;
    assert_eq!(tokens(&app, &good, Some("198.51.100.7")).await.status(), StatusCode::OK);
    let calls = hub.user_calls().await;

    // One made-up token, presented again and again: one hub call (the
    // negative cache), then 429 once the address has failed too often.
    let made_up = "made-up-token-0123456789";
    let mut statuses = vec![];
    for _ in 0..15 {
        let response = tokens(&app, made_up, Some("198.51.100.7")).await;
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=4).contains(&retry), "{retry}");
            let body = assert_json_error(response, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
            assert!(!body.to_string().contains(made_up));
        }
    }
    assert_eq!(hub.user_calls().await - calls, 1, "the unknown token was asked about once");
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{statuses:?}");
    assert!(statuses[11..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");

    // Fresh made-up tokens from the slowed address: 429 before any hub call.
    let calls = hub.user_calls().await;
    for i in 0..5 {
        let response = tokens(&app, &format!("another-made-up-{i}"), Some("198.51.100.7")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(hub.user_calls().await, calls, "no hub call while slowed down");
    // A server the hub already vouched for is not slowed down by others
    // failing behind the same address; another address is not slowed at all.
    assert_eq!(tokens(&app, &good, Some("198.51.100.7")).await.status(), StatusCode::OK);
    assert_eq!(tokens(&app, "yet-another-made-up", Some("198.51.100.8")).await.status(), StatusCode::UNAUTHORIZED);

    // Bad hub client credentials count too, at the token endpoint and the spawn call.
    for _ in 0..11 {
        let _ = reqwest::Client::new()
            .post(app.url("/oauth2/token"))
            .header("x-forwarded-for", "198.51.100.9")
            .basic_auth(HUB_CLIENT_ID, Some("wrong"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", "x")])
            .send()
            .await
            .unwrap();
    }
    let slowed = reqwest::Client::new()
        .post(app.url("/api/v1/hub/spawn"))
        .header("x-forwarded-for", "198.51.100.9")
        .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
        .json(&serde_json::json!({"user": "ted"}))
        .send()
        .await
        .unwrap();
    assert_json_error(slowed, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
    // Without X-Forwarded-For, the peer address (127.0.0.1, the proxy) counts: not slowed.
    let direct = reqwest::Client::new()
        .post(app.url("/api/v1/hub/spawn"))
        .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
        .json(&serde_json::json!({"user": "ted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), StatusCode::OK);
}

#[tokio::test]
async fn opened_lineages_leave_memory_after_their_second() {
    let hub = HubMock::start().await;
    let app = logged_in(&hub, "uli", None).await;
    let good = hub.server_token("uli").await;
    assert_eq!(tokens(&app, &good, None).await.status(), StatusCode::OK);
    let vault = &app.state().vault;
    vault.sweep();
    assert_eq!(vault.cached_count(), 1, "the hot path keeps the opened lineage for a second");
    // Housekeeping runs every second; nothing else touches the cache.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(vault.cached_count(), 0, "the decrypted lineage is gone after its second");
}

#[tokio::test]
async fn the_audit_log_records_events_without_token_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let hub = HubMock::start().await;
    let app = logged_in(&hub, "val", Some(&path)).await;
    let good = hub.server_token("val").await;
    let response = reqwest::Client::new()
        .get(app.url("/api/v1/tokens"))
        .header("authorization", format!("token {good}"))
        .header("x-request-id", "req-audit-1")
        .header("x-forwarded-for", "192.0.2.5")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let forced = reqwest::Client::new()
        .post(app.url("/api/v1/tokens/refresh"))
        .header("authorization", format!("token {good}"))
        .send()
        .await
        .unwrap();
    let forced: Value = forced.json().await.unwrap();
    let narrow = hub.token_with("val", "user", &["read:users:activity!user"]).await;
    assert_eq!(tokens(&app, &narrow, None).await.status(), StatusCode::FORBIDDEN);
    let spawn = reqwest::Client::new()
        .post(app.url("/api/v1/hub/spawn"))
        .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
        .json(&serde_json::json!({"user": "val"}))
        .send()
        .await
        .unwrap();
    assert_eq!(spawn.status(), StatusCode::OK);

    // Fetch lines are written by the audit's own thread: wait for it.
    app.state().audit.flush();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    for event in ["login", "hub_login", "notebook_fetch", "refresh", "notebook_refresh", "refused", "spawn"] {
        assert!(events.contains(&event), "{event} missing from {events:?}");
    }
    let fetch = lines.iter().find(|l| l["event"] == "notebook_fetch").unwrap();
    assert_eq!(fetch["user"], "val");
    assert_eq!(fetch["request_id"], "req-audit-1");
    assert_eq!(fetch["client"], "192.0.2.5");
    assert!(fetch["version"].as_i64().is_some());
    let refused = lines.iter().find(|l| l["event"] == "refused").unwrap();
    assert!(refused["detail"].as_str().unwrap().contains("scope"), "{refused}");
    for secret in
        [&body["access_token"], &body["refresh_token"], &body["id_token"], &forced["refresh_token"], &forced["access_token"]]
    {
        assert!(!text.contains(secret.as_str().unwrap()), "a token value is in the audit log");
    }
    assert!(!text.contains(&good) && !text.contains(&narrow));
}

#[tokio::test]
async fn openapi_document_describes_the_json_api() {
    let app = TestApp::builder(&Idp::shared().issuer).base_path("/services/tokenhub").spawn().await;
    let response = reqwest::get(app.url("/api/v1/openapi.json")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["servers"][0]["url"], app.base);
    for (path, method) in [
        ("/api/v1/tokens", "get"),
        ("/api/v1/tokens/refresh", "post"),
        ("/api/v1/hub/spawn", "post"),
        ("/api/v1/admin/lineages", "get"),
        ("/oauth2/token", "post"),
        ("/oauth2/userinfo", "get"),
        ("/healthz", "get"),
    ] {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{path} {method} missing");
        for (status, response) in op["responses"].as_object().unwrap() {
            if status != "200" {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(schema, "#/components/schemas/ErrorBody", "{path} {status}");
            }
        }
    }
    assert!(doc["paths"]["/api/v1/tokens"]["get"]["responses"]["403"].is_object());
    assert!(doc["components"]["securitySchemes"]["hub_token"].is_object());
}

/// The token endpoint, the spawn call and the notebook API answer any body
/// with a JSON 4xx, never a 5xx or a panic (bounded: 48 cases each).
#[test]
fn hostile_bodies_get_json_4xx() {
    use proptest::prelude::*;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(TestApp::builder(&Idp::shared().issuer).spawn());
    let client = reqwest::Client::new();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..400),
        prop_oneof![
            Just("application/x-www-form-urlencoded"),
            Just("application/json"),
            Just("text/plain"),
            Just("multipart/form-data; boundary=x"),
        ],
        prop_oneof![Just("/oauth2/token"), Just("/api/v1/hub/spawn"), Just("/api/v1/tokens/refresh")],
    );
    runner
        .run(&strategy, |(body, content_type, path)| {
            let response = runtime.block_on(
                client
                    .post(app.url(path))
                    .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
                    .header("content-type", content_type)
                    .body(body)
                    .send(),
            );
            let response = response.unwrap();
            let status = response.status();
            prop_assert!(
                status.is_client_error() || (status == StatusCode::SERVICE_UNAVAILABLE && path == "/api/v1/tokens/refresh"),
                "{path}: {status}"
            );
            let json_type = response.headers()["content-type"].to_str().unwrap().starts_with("application/json");
            prop_assert!(json_type, "{path}: {status} is not JSON");
            Ok(())
        })
        .unwrap();
}
