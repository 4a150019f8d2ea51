//! The pre-spawn hook's call, and the token file written once the server is
//! ready (the hub's API and the server's Contents API mocked).

use std::time::Duration;

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

async fn spawn_call(app: &TestApp, secret: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(app.url("/api/v1/hub/spawn"))
        .basic_auth(HUB_CLIENT_ID, Some(secret))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn spawn_hands_out_the_environment_then_writes_the_file_when_ready() {
    let hub = HubMock::start().await;
    let proxy = hub.server.uri();
    let app = TestApp::builder(&Idp::shared().issuer)
        .hub(&hub)
        .settings(|s| s.hub_url = Some(url::Url::parse(&proxy).unwrap()))
        .spawn()
        .await;
    Hub::login(&app, &Browser::new(), "yara").await;
    let lineage = app.state().vault.load("yara", &Idp::shared().issuer).await.unwrap().unwrap();
    let refresh = lineage.tokens.refresh_token.as_ref().unwrap().expose_secret().to_string();

    // The hub reports the server as starting, then ready.
    Mock::given(method("GET"))
        .and(path("/hub/api/users/yara"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "name": "yara", "servers": {"": {"ready": false, "url": "/user/yara/", "pending": "spawn"}}
        })))
        .up_to_n_times(2)
        .mount(&hub.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/hub/api/users/yara"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "name": "yara", "servers": {"": {"ready": true, "url": "/user/yara/"}}
        })))
        .mount(&hub.server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/user/yara/api/contents/.tokens.json"))
        .respond_with(ResponseTemplate::new(201))
        .expect(1)
        .mount(&hub.server)
        .await;
    let server_token = hub.token_with("yara", "user", &["access:servers!server=yara/", "access:services!service=tokenhub"]).await;

    let response = spawn_call(&app, HUB_CLIENT_SECRET, json!({"user": "yara", "server": "", "server_token": server_token})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["env"]["CILOGON_REFRESH_TOKEN"], refresh.as_str());
    assert_eq!(body["env"]["TOKENHUB_URL"], app.base.as_str());
    assert_eq!(body["token_file"], ".tokens.json");

    // The file arrives once the server is ready, with the current lineage.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let put = loop {
        let requests = hub.server.received_requests().await.unwrap();
        if let Some(put) = requests.into_iter().find(|r| r.method.as_str() == "PUT") {
            break put;
        }
        assert!(std::time::Instant::now() < deadline, "no token file was written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Written with the server's own token, never tokenhub's (which reaches
    // every server, and the server's owner sees every header).
    assert_eq!(put.headers["authorization"], format!("token {server_token}").as_str());
    let sent: Value = serde_json::from_slice(&put.body).unwrap();
    assert_eq!(sent["type"], "file");
    let document: Value = serde_json::from_str(sent["content"].as_str().unwrap()).unwrap();
    assert_eq!(document["refresh_token"], refresh.as_str());
    assert_eq!(document["state"], "Valid");
    // tokenhub books the delivery once the server has answered the PUT.
    while app.state().deliveries.of("yara").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the delivery was not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.state().deliveries.of("yara").await[0].version, lineage.version);
}

#[tokio::test]
async fn spawn_refuses_bad_credentials_unknown_users_and_bad_bodies() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let wrong = spawn_call(&app, "wrong", json!({"user": "zed"})).await;
    assert_json_error(wrong, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let unknown = spawn_call(&app, HUB_CLIENT_SECRET, json!({"user": "nobody"})).await;
    assert_json_error(unknown, StatusCode::NOT_FOUND, "unknown_user").await;
    let malformed = reqwest::Client::new()
        .post(app.url("/api/v1/hub/spawn"))
        .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
        .header("content-type", "application/json")
        .body("{\"user\":")
        .send()
        .await
        .unwrap();
    assert_json_error(malformed, StatusCode::BAD_REQUEST, "invalid_request").await;
}
