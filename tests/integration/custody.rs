//! Custody of what tokenhub presents to users' servers (the hub's API and
//! the servers' Contents API mocked): only a server's own token, checked
//! with the hub first; files that only move forward; hub paths
//! percent-encoded and answers checked to name the user asked about.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

async fn app(hub: &HubMock) -> TestApp {
    let proxy = url::Url::parse(&hub.server.uri()).unwrap();
    TestApp::builder(&Idp::shared().issuer).hub(hub).settings(|s| s.hub_url = Some(proxy)).spawn().await
}

async fn login(app: &TestApp, user: &str) {
    let (code, login) = Hub::login(app, &Browser::new(), user).await;
    assert_eq!(Hub::exchange_code(app, &code, &login).await.status(), reqwest::StatusCode::OK);
}

async fn puts(hub: &HubMock) -> Vec<wiremock::Request> {
    hub.server.received_requests().await.unwrap().into_iter().filter(|r| r.method.as_str() == "PUT").collect()
}

fn version_of(put: &wiremock::Request) -> String {
    let body: Value = serde_json::from_slice(&put.body).unwrap();
    let document: Value = serde_json::from_str(body["content"].as_str().unwrap()).unwrap();
    document["refresh_token"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn only_the_servers_own_token_is_presented_and_never_tokenhubs() {
    let hub = HubMock::start().await;
    let app = app(&hub).await;
    login(&app, "olga").await;
    let server_token = hub.running(&app, "olga").await;
    wait_until(Duration::from_secs(10), "the file is written", async || !puts(&hub).await.is_empty()).await;
    app.state()
        .refresher
        .fresh(app.state(), "olga", tokenhub::tokens::refresh::Want { min_valid: None, force: true })
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the file is written again", async || puts(&hub).await.len() >= 2).await;
    for put in puts(&hub).await {
        assert_eq!(put.headers["authorization"], format!("token {server_token}").as_str());
    }
    // Nothing tokenhub sent to the server (the proxy's paths) carried its own token.
    for request in hub.server.received_requests().await.unwrap() {
        if request.url.path().starts_with("/user/") {
            let auth = request.headers.get("authorization").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            assert!(!auth.contains("tokenhub-service-token"), "{} carried tokenhub's token", request.url.path());
        }
    }
    // The audit line names the server token's id, never its value.
    let logs = logs();
    assert!(logs.contains("that server's own hub token a"), "the audit names the token id");
    assert!(!logs.contains(&server_token));
}

#[tokio::test]
async fn a_server_token_the_hub_says_is_someone_elses_is_not_presented() {
    let hub = HubMock::start().await;
    let app = app(&hub).await;
    login(&app, "pia").await;
    // The hub lists pia's server; the token handed over is mallory's.
    Mock::given(method("GET"))
        .and(path("/hub/api/users/pia"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "name": "pia", "servers": {"": {"ready": true, "url": "/user/pia/"}}
        })))
        .mount(&hub.server)
        .await;
    let mallorys = hub.token_with("mallory", "user", &["access:servers!server=mallory/"]).await;
    let pias_narrow = hub.token_with("pia", "user", &["access:services!service=tokenhub"]).await;
    for token in [&mallorys, &pias_narrow] {
        let response = reqwest::Client::new()
            .post(app.url("/api/v1/hub/spawn"))
            .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
            .json(&json!({"user": "pia", "server": "", "server_token": token}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(puts(&hub).await.is_empty(), "no token was presented to pia's server");
    assert!(logs().contains("the server's hub token is not presented"));
}

#[tokio::test]
async fn a_servers_file_only_moves_forward_under_concurrent_refreshes() {
    let hub = HubMock::start().await;
    let app = app(&hub).await;
    login(&app, "quinn").await;
    hub.server.reset().await;
    // A slow server: writes overlap unless tokenhub serializes them.
    Mock::given(method("GET"))
        .and(path("/hub/api/users/quinn"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "name": "quinn", "servers": {"": {"ready": true, "url": "/user/quinn/"}}
        })))
        .mount(&hub.server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/user/quinn/api/contents/.tokens.json"))
        .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_millis(150)))
        .mount(&hub.server)
        .await;
    let token = hub.token_with("quinn", "user", &["access:servers!server=quinn/"]).await;
    app.state().vault.save_server_credential("quinn", "", &token.clone().into()).await.unwrap();

    let want = tokenhub::tokens::refresh::Want { min_valid: None, force: true };
    for _ in 0..8 {
        let calls = (0..5).map(|_| app.state().refresher.fresh(app.state(), "quinn", want));
        for result in futures::future::join_all(calls).await {
            result.unwrap();
        }
    }
    let current = app.state().vault.load("quinn", &Idp::shared().issuer).await.unwrap().unwrap();
    let current_refresh = secrecy::ExposeSecret::expose_secret(current.tokens.refresh_token.as_ref().unwrap()).to_string();
    wait_until(Duration::from_secs(20), "the file holds the current refresh token", async || {
        puts(&hub).await.last().is_some_and(|p| version_of(p) == current_refresh)
            && app.state().deliveries.of("quinn").await.first().is_some_and(|d| d.version == current.version)
    })
    .await;
    // Every write carried a newer lineage than the one before: the refresh
    // tokens written are all different, and their order is the vault's.
    let written: Vec<String> = puts(&hub).await.iter().map(version_of).collect();
    let mut seen = std::collections::HashSet::new();
    assert!(written.iter().all(|t| seen.insert(t.clone())), "a version was written twice or went back: {} writes", written.len());
    let audit = logs();
    let versions: Vec<i64> = audit
        .lines()
        .filter(|l| l.contains("token file written") && l.contains("token_id=") && l.contains("quinn"))
        .filter_map(|l| l.split("version=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "versions written in order: {versions:?}");
    assert_eq!(versions.last().copied(), Some(current.version));
}

#[tokio::test]
async fn hub_paths_are_percent_encoded_and_answers_must_name_the_user() {
    let hub = HubMock::start().await;
    let app = app(&hub).await;
    // `a b` is asked about as `a%20b` (a form-encoded `a+b` names user `a+b`).
    Mock::given(method("GET"))
        .and(path("/hub/api/users/a%20b"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "name": "a b", "servers": {"": {"ready": true, "url": "/user/a%20b/"}}
        })))
        .mount(&hub.server)
        .await;
    let servers = app.state().hub.servers("a b").await.unwrap();
    assert_eq!(servers.len(), 1);
    let asked: Vec<String> = hub.server.received_requests().await.unwrap().iter().map(|r| r.url.path().to_string()).collect();
    assert!(asked.contains(&"/hub/api/users/a%20b".to_string()), "{asked:?}");
    // An answer about another user is refused, not believed.
    Mock::given(method("GET"))
        .and(path("/hub/api/users/eve"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "name": "eve2", "servers": {"": {"ready": true, "url": "/user/eve2/"}}
        })))
        .mount(&hub.server)
        .await;
    assert!(app.state().hub.servers("eve").await.is_err());
    assert_eq!(tokenhub::hub::path_segment("a+b/c d%"), "a%2Bb%2Fc%20d%25");
}

#[tokio::test]
async fn a_shared_server_gets_a_note_and_its_token_no_tokens_until_the_share_is_gone() {
    let hub = HubMock::start().await;
    let app = app(&hub).await;
    login(&app, "sol").await;
    // sol's server is shared with rex.
    let share = Mock::given(method("GET"))
        .and(path("/hub/api/shares/sol"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "items": [{"server": {"name": "", "user": {"name": "sol"}}, "user": {"name": "rex"}, "kind": "user"}]
        })))
        .named("sol's share")
        .mount_as_scoped(&hub.server)
        .await;
    let server_token = hub.running(&app, "sol").await;
    tokenhub::tokens::sharing::watch(app.state(), Duration::from_millis(500));
    wait_until(Duration::from_secs(10), "the note is written", async || !puts(&hub).await.is_empty()).await;
    let note: Value = {
        let body: Value = serde_json::from_slice(&puts(&hub).await[0].body).unwrap();
        serde_json::from_str(body["content"].as_str().unwrap()).unwrap()
    };
    assert_eq!(note["state"], "Withheld");
    assert!(note.get("refresh_token").is_none() && note.get("access_token").is_none());
    // The server's own token gets 403 saying why; sol's other tokens still work.
    let refused = reqwest::Client::new()
        .get(app.url("/api/v1/tokens"))
        .header("authorization", format!("token {server_token}"))
        .send()
        .await
        .unwrap();
    let body = assert_json_error(refused, reqwest::StatusCode::FORBIDDEN, "access_denied").await;
    assert!(body["error_description"].as_str().unwrap().contains("shared"));
    let personal = hub.token_with("sol", "user", &["access:services!service=tokenhub"]).await;
    let ok = reqwest::Client::new()
        .get(app.url("/api/v1/tokens"))
        .header("authorization", format!("token {personal}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), reqwest::StatusCode::OK);
    // A spawn while shared hands out no refresh token.
    let spawn = reqwest::Client::new()
        .post(app.url("/api/v1/hub/spawn"))
        .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
        .json(&json!({"user": "sol", "server": "", "server_token": server_token}))
        .send()
        .await
        .unwrap();
    let answer: Value = spawn.json().await.unwrap();
    assert_eq!(answer["withheld"], true);
    assert!(answer["env"].get("CILOGON_REFRESH_TOKEN").is_none());

    // The share goes: within the watch's period the tokens come back.
    drop(share);
    let current = app.state().vault.load("sol", &Idp::shared().issuer).await.unwrap().unwrap();
    let refresh = secrecy::ExposeSecret::expose_secret(current.tokens.refresh_token.as_ref().unwrap()).to_string();
    wait_until(Duration::from_secs(15), "the token file is back", async || {
        puts(&hub).await.last().is_some_and(|p| version_of(p) == refresh)
    })
    .await;
    wait_until(Duration::from_secs(10), "the server's token reads tokens again", async || {
        let r = reqwest::Client::new()
            .get(app.url("/api/v1/tokens"))
            .header("authorization", format!("token {server_token}"))
            .send()
            .await
            .unwrap();
        r.status() == reqwest::StatusCode::OK
    })
    .await;
}
