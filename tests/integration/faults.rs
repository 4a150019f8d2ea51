//! IdP faults during a refresh (a mock IdP, for answers a real one will not
//! give on demand): the lineage survives, valid tokens keep being served, a
//! needed refresh gets 503 with Retry-After, and it works once the IdP is back.

use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::id_token::{KEY1, MockIdp, login_with, sign, token_response};
use crate::support::*;

#[tokio::test]
async fn idp_failures_keep_the_lineage_and_answer_503() {
    let idp = MockIdp::start().await;
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer()).hub(&hub).spawn().await;
    let response = login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k1", KEY1))).await;
    assert!(location(&response).as_str().starts_with(HUB_REDIRECT_URI));
    let token = hub.server_token("mockuser").await;
    let get = |query: &'static str| {
        let (url, token) = (app.url("/api/v1/tokens"), token.clone());
        async move {
            reqwest::Client::new()
                .get(format!("{url}{query}"))
                .header("authorization", format!("token {token}"))
                .send()
                .await
                .unwrap()
        }
    };
    age_lineage(&app, "mockuser", 100).await;
    let before = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();

    // The IdP fails every attempt: 503 for the caller that needs a refresh.
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(503).set_body_string("down for maintenance"))
        .up_to_n_times(3)
        .expect(3)
        .mount(&idp.server)
        .await;
    let response = get("?min_valid=250").await;
    assert!(response.headers().contains_key("retry-after"));
    assert_json_error(response, StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable").await;
    let after = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();
    assert!(after.active, "the lineage survives");
    assert_eq!(after.version, before.version);

    // Tokens that are still valid keep being served.
    let body: Value = get("").await.json().await.unwrap();
    assert_eq!(body["access_token"], "mock-access-token-0123456789abcdef");

    // Bad JSON in a 200 is no reason to kill the lineage either, and no
    // reason to send the refresh token again at once: the 200 may have
    // spent it. One request, then 503.
    let bad_json = Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).insert_header("content-type", "application/json").set_body_string("{oops"))
        .up_to_n_times(1)
        .expect(1)
        .named("a 200 with bad JSON")
        .mount_as_scoped(&idp.server)
        .await;
    assert_eq!(get("?min_valid=250").await.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap().active);
    drop(bad_json); // checks it was asked exactly once

    // The IdP is back: the refresh goes through and the rotated token is kept.
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "mock-access-token-after-the-outage",
            "token_type": "Bearer",
            "expires_in": 300,
            "refresh_token": "mock-refresh-token-after-the-outage",
        })))
        .mount(&idp.server)
        .await;
    let response = get("?min_valid=250").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["access_token"], "mock-access-token-after-the-outage");
    assert_eq!(body["refresh_token"], "mock-refresh-token-after-the-outage");
    assert_eq!(body["id_token"], before_id_token(&before), "the ID token is kept when none comes back");
}

fn before_id_token(lineage: &tokenhub::vault::Lineage) -> String {
    use secrecy::ExposeSecret;
    lineage.tokens.id_token.expose_secret().to_string()
}
