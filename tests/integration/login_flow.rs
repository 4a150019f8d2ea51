//! The whole login against a real OpenID provider (npm oidc-provider, PKCE
//! required, refresh-token rotation on), driven by a client playing the hub.

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn hub_login_stores_upstream_tokens_and_serves_userinfo() {
    let idp = Idp::shared();
    let app = TestApp::builder(&idp.issuer).spawn().await;
    let browser = Browser::new();

    let (code, login) = Hub::login(&app, &browser, "alice").await;
    let response = Hub::exchange_code(&app, &code, &login).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let tokens: Value = response.json().await.unwrap();
    assert_eq!(tokens["token_type"], "Bearer");
    let access = tokens["access_token"].as_str().unwrap();
    assert!(tokens["refresh_token"].as_str().is_some());

    let info: Value = Hub::userinfo(&app, access).await.json().await.unwrap();
    assert_eq!(info["preferred_username"], "alice");
    assert_eq!(info["username"], "alice");
    assert_eq!(info["email"], "alice@example.org");
    assert_eq!(info["groups"], serde_json::json!(["users"]));
    assert_eq!(info["upstream_issuer"], idp.issuer.as_str());

    // The vault holds the upstream tokens, and they are the IdP's.
    let lineage = app.state().vault.load("alice", &idp.issuer).await.unwrap().expect("lineage stored");
    assert_eq!(lineage.subject, "alice");
    assert_eq!(lineage.version, 1);
    assert!(lineage.active);
    let refresh = lineage.tokens.refresh_token.as_ref().expect("offline_access gives a refresh token");
    assert!(!refresh.expose_secret().is_empty());
    assert!(lineage.tokens.scope.contains("openid"), "{}", lineage.tokens.scope);
    assert!(lineage.tokens.access_expires_at.unwrap() > tokenhub::time::now());
    assert_eq!(lineage.tokens.id_token.expose_secret().split('.').count(), 3);
    assert_eq!(lineage.claims["groups"], serde_json::json!(["users"]));
    // The upstream access token works at the IdP's userinfo endpoint.
    let upstream_info = json_of(
        reqwest::Client::new().get(format!("{}/me", idp.issuer)).bearer_auth(lineage.tokens.access_token.expose_secret()),
    )
    .await;
    assert_eq!(upstream_info["sub"], "alice");
    assert!(idp.stats().await["authorization_code"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn a_new_login_replaces_the_lineage() {
    let idp = Idp::shared();
    let app = TestApp::builder(&idp.issuer).spawn().await;
    let browser = Browser::new();
    Hub::login(&app, &browser, "bob").await;
    let first = app.state().vault.load("bob", &idp.issuer).await.unwrap().unwrap();
    // A second login (the IdP session is alive: no form this time).
    let (code, login) = Hub::login(&app, &browser, "bob").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    let second = app.state().vault.load("bob", &idp.issuer).await.unwrap().unwrap();
    assert_eq!(second.version, first.version + 1);
    assert_ne!(
        second.tokens.refresh_token.as_ref().unwrap().expose_secret(),
        first.tokens.refresh_token.as_ref().unwrap().expose_secret()
    );
    assert_eq!(app.lineage_count().await, 1, "one lineage per user per issuer");
}

#[tokio::test]
async fn hub_refresh_token_grant_rotates_and_is_single_use() {
    let idp = Idp::shared();
    let app = TestApp::builder(&idp.issuer).spawn().await;
    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "carol").await;
    let tokens: Value = Hub::exchange_code(&app, &code, &login).await.json().await.unwrap();
    let refresh = tokens["refresh_token"].as_str().unwrap();

    let response = Hub::exchange(&app, &[("grant_type", "refresh_token"), ("refresh_token", refresh)]).await;
    assert_eq!(response.status(), StatusCode::OK);
    let renewed: Value = response.json().await.unwrap();
    assert_ne!(renewed["access_token"], tokens["access_token"]);
    assert_ne!(renewed["refresh_token"], tokens["refresh_token"]);
    let info: Value = Hub::userinfo(&app, renewed["access_token"].as_str().unwrap()).await.json().await.unwrap();
    assert_eq!(info["username"], "carol");

    let again = Hub::exchange(&app, &[("grant_type", "refresh_token"), ("refresh_token", refresh)]).await;
    assert_json_error(again, StatusCode::BAD_REQUEST, "invalid_grant").await;
}

#[tokio::test]
async fn client_secret_post_is_accepted() {
    let idp = Idp::shared();
    let app = TestApp::builder(&idp.issuer).spawn().await;
    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "dave").await;
    let response = reqwest::Client::new()
        .post(app.url("/oauth2/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", HUB_REDIRECT_URI),
            ("code_verifier", login.verifier.as_str()),
            ("client_id", HUB_CLIENT_ID),
            ("client_secret", HUB_CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn works_under_a_service_prefix() {
    let idp = Idp::shared();
    let app = TestApp::builder(&idp.issuer).base_path("/services/tokenhub").spawn().await;
    assert!(app.base.ends_with("/services/tokenhub"));
    let discovery: Value = reqwest::get(app.url("/.well-known/openid-configuration")).await.unwrap().json().await.unwrap();
    assert_eq!(discovery["token_endpoint"], app.url("/oauth2/token"));
    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "erin").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn no_token_value_reaches_the_database_file_or_the_logs() {
    let idp = Idp::shared();
    let app = TestApp::builder(&idp.issuer).spawn().await;
    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "frank").await;
    let hub_tokens: Value = Hub::exchange_code(&app, &code, &login).await.json().await.unwrap();
    let lineage = app.state().vault.load("frank", &idp.issuer).await.unwrap().unwrap();

    let mut secrets = vec![
        lineage.tokens.access_token.expose_secret().to_string(),
        lineage.tokens.id_token.expose_secret().to_string(),
        lineage.tokens.refresh_token.as_ref().unwrap().expose_secret().to_string(),
        hub_tokens["access_token"].as_str().unwrap().to_string(),
        hub_tokens["refresh_token"].as_str().unwrap().to_string(),
        code.clone(),
    ];
    // The ID token's signature alone is as identifying as the whole token.
    secrets.push(secrets[1].rsplit('.').next().unwrap().to_string());
    // Debug output of the lineage redacts token values too.
    let debug = format!("{lineage:?}");
    let database = app.database_bytes();
    let logs = logs();
    assert!(logs.contains("login stored"), "the log capture works");
    for secret in &secrets {
        assert!(secret.len() >= 16);
        assert!(!logs.contains(secret.as_str()), "a token value is in the logs");
        assert!(!debug.contains(secret.as_str()), "a token value is in Debug output");
        assert!(!database.windows(secret.len()).any(|w| w == secret.as_bytes()), "a token value is in the database file");
    }
}
