//! Bad input at every step gets a precise 4xx (JSON for the hub, a page for
//! the browser) and changes nothing in the vault.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;

/// Starts a login and signs in at the IdP, stopping before the callback.
async fn until_callback(app: &TestApp, browser: &Browser, user: &str) -> (url::Url, HubLogin) {
    let (url, login) = Hub::authorize_url(app);
    let to_idp = location(&browser.get(url).await);
    (browser.sign_in_at_idp(to_idp, user).await, login)
}

#[tokio::test]
async fn forged_missing_or_foreign_state_is_refused_at_the_callback() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    let (back, _) = until_callback(&app, &browser, "mallory").await;
    let code = query(&back, "code").unwrap();

    let forged = browser.get(format!("{}?code={code}&state=forged-state", app.url("/callback"))).await;
    let page = assert_error_page(forged, StatusCode::BAD_REQUEST).await;
    assert!(page.contains("Sign in again"));
    let missing = browser.get(format!("{}?code={code}", app.url("/callback"))).await;
    assert_error_page(missing, StatusCode::BAD_REQUEST).await;
    // The right state from a browser that never started this login.
    let other_browser = Browser::new();
    let foreign = other_browser.deliver_callback(&app, &back).await;
    assert_error_page(foreign, StatusCode::BAD_REQUEST).await;
    assert_eq!(app.lineage_count().await, 0);

    // The real browser still completes its login afterwards.
    let response = browser.deliver_callback(&app, &back).await;
    assert!(location(&response).as_str().starts_with(HUB_REDIRECT_URI));
    assert_eq!(app.lineage_count().await, 1);
    // ...once: the cookie is gone and the IdP's code is spent.
    let replay = browser.deliver_callback(&app, &back).await;
    assert_error_page(replay, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn a_tampered_login_cookie_is_refused() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let (url, _) = Hub::authorize_url(&app);
    let response =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap().get(url).send().await.unwrap();
    let state = query(&location(&response), "state").unwrap();
    let set_cookie = response.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"), "{set_cookie}");
    let (name, rest) = set_cookie.split_once('=').unwrap();
    let value = rest.split(';').next().unwrap();
    let mut tampered = value.to_string();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let response = reqwest::Client::new()
        .get(format!("{}?code=x&state={state}", app.url("/callback")))
        .header("cookie", format!("{name}={tampered}"))
        .send()
        .await
        .unwrap();
    assert_error_page(response, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn idp_error_at_the_callback_is_shown() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    let (url, _) = Hub::authorize_url(&app);
    let to_idp = location(&browser.get(url).await);
    let state = query(&to_idp, "state").unwrap();
    let response = browser
        .get(format!("{}?error=access_denied&error_description=%3Cscript%3Euser+said+no&state={state}", app.url("/callback")))
        .await;
    let page = assert_error_page(response, StatusCode::FORBIDDEN).await;
    assert!(page.contains("access_denied"));
    assert!(!page.contains("<script>"), "IdP text is escaped");
    assert_eq!(app.lineage_count().await, 0);
}

#[tokio::test]
async fn replayed_code_wrong_verifier_wrong_redirect_and_expired_code_are_invalid_grant() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();

    // Replay.
    let (code, login) = Hub::login(&app, &browser, "grace").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    assert_json_error(Hub::exchange_code(&app, &code, &login).await, StatusCode::BAD_REQUEST, "invalid_grant").await;

    // Wrong PKCE verifier, and the code is burnt by the attempt.
    let (code, login) = Hub::login(&app, &browser, "grace").await;
    let wrong = HubLogin { state: login.state.clone(), verifier: tokenhub::vault::crypto::random_token() };
    let body = assert_json_error(Hub::exchange_code(&app, &code, &wrong).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert!(body["error_description"].as_str().unwrap().contains("PKCE"));
    assert_json_error(Hub::exchange_code(&app, &code, &login).await, StatusCode::BAD_REQUEST, "invalid_grant").await;

    // Missing verifier when a challenge was sent.
    let (code, _) = Hub::login(&app, &browser, "grace").await;
    let response =
        Hub::exchange(&app, &[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", HUB_REDIRECT_URI)]).await;
    assert_json_error(response, StatusCode::BAD_REQUEST, "invalid_grant").await;

    // Wrong redirect URI.
    let (code, login) = Hub::login(&app, &browser, "grace").await;
    let response = Hub::exchange(
        &app,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1:8081/elsewhere"),
            ("code_verifier", &login.verifier),
        ],
    )
    .await;
    assert_json_error(response, StatusCode::BAD_REQUEST, "invalid_grant").await;

    // Expired code.
    let (code, login) = Hub::login(&app, &browser, "grace").await;
    app.sql("UPDATE hub_codes SET expires_at = expires_at - 120").await;
    let body = assert_json_error(Hub::exchange_code(&app, &code, &login).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert!(body["error_description"].as_str().unwrap().contains("expired"));

    // None of this changed the vault beyond the logins themselves.
    assert_eq!(app.lineage_count().await, 1);
}

#[tokio::test]
async fn wrong_client_credentials_are_invalid_client() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "heidi").await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", HUB_REDIRECT_URI),
        ("code_verifier", login.verifier.as_str()),
    ];
    let client = reqwest::Client::new();
    let wrong_basic =
        client.post(app.url("/oauth2/token")).basic_auth(HUB_CLIENT_ID, Some("wrong")).form(&form).send().await.unwrap();
    assert!(wrong_basic.headers().contains_key("www-authenticate"));
    assert_json_error(wrong_basic, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let mut post = form.to_vec();
    post.extend([("client_id", HUB_CLIENT_ID), ("client_secret", "wrong")]);
    let wrong_post = client.post(app.url("/oauth2/token")).form(&post).send().await.unwrap();
    assert_json_error(wrong_post, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let none = client.post(app.url("/oauth2/token")).form(&form).send().await.unwrap();
    assert_json_error(none, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let garbled = client.post(app.url("/oauth2/token")).header("authorization", "Basic %%%").form(&form).send().await.unwrap();
    assert_json_error(garbled, StatusCode::UNAUTHORIZED, "invalid_client").await;
    // Client failures did not spend the code.
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn malformed_token_requests_get_json_errors() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let unsupported = Hub::exchange(&app, &[("grant_type", "password"), ("username", "a")]).await;
    assert_json_error(unsupported, StatusCode::BAD_REQUEST, "unsupported_grant_type").await;
    let missing = Hub::exchange(&app, &[("code", "x")]).await;
    assert_json_error(missing, StatusCode::BAD_REQUEST, "invalid_request").await;
    let no_code = Hub::exchange(&app, &[("grant_type", "authorization_code")]).await;
    assert_json_error(no_code, StatusCode::BAD_REQUEST, "invalid_request").await;
    let unknown =
        Hub::exchange(&app, &[("grant_type", "authorization_code"), ("code", "nope"), ("redirect_uri", HUB_REDIRECT_URI)]).await;
    assert_json_error(unknown, StatusCode::BAD_REQUEST, "invalid_grant").await;
    let client = reqwest::Client::new();
    let json_body = client
        .post(app.url("/oauth2/token"))
        .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
        .header("content-type", "application/json")
        .body("{\"grant_type\":")
        .send()
        .await
        .unwrap();
    assert_json_error(json_body, StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request").await;
    let huge = client
        .post(app.url("/oauth2/token"))
        .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=authorization_code&code={}", "a".repeat(200_000)))
        .send()
        .await
        .unwrap();
    assert_json_error(huge, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request").await;
}

#[tokio::test]
async fn userinfo_needs_a_valid_bearer_token() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let none = reqwest::get(app.url("/oauth2/userinfo")).await.unwrap();
    assert!(none.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    assert_json_error(none, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert_json_error(Hub::userinfo(&app, "made-up").await, StatusCode::UNAUTHORIZED, "invalid_token").await;

    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "ivan").await;
    let tokens: Value = Hub::exchange_code(&app, &code, &login).await.json().await.unwrap();
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(Hub::userinfo(&app, access).await.status(), StatusCode::OK);
    app.sql("UPDATE hub_tokens SET expires_at = 1").await;
    assert_json_error(Hub::userinfo(&app, access).await, StatusCode::UNAUTHORIZED, "invalid_token").await;
}

#[tokio::test]
async fn bad_authorize_requests_are_refused() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    let (good, _) = Hub::authorize_url(&app);

    let unknown_client = good.replace(&format!("client_id={HUB_CLIENT_ID}"), "client_id=intruder");
    assert_error_page(browser.get(unknown_client).await, StatusCode::BAD_REQUEST).await;
    let wrong_redirect = good.replace("oauth_callback", "evil");
    let page = assert_error_page(browser.get(wrong_redirect).await, StatusCode::BAD_REQUEST).await;
    assert!(page.contains("redirect_uri"));

    // Errors the hub can handle go back to the hub, with its state.
    let plain = good.replace("code_challenge_method=S256", "code_challenge_method=plain");
    let back = location(&browser.get(plain).await);
    assert!(back.as_str().starts_with(HUB_REDIRECT_URI));
    assert_eq!(query(&back, "error").as_deref(), Some("invalid_request"));
    assert!(query(&back, "state").is_some());
    let token_flow = good.replace("response_type=code", "response_type=token");
    let back = location(&browser.get(token_flow).await);
    assert_eq!(query(&back, "error").as_deref(), Some("unsupported_response_type"));
}

#[tokio::test]
async fn unreachable_idp_gives_a_clear_page() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let app = TestApp::builder(&closed).spawn().await;
    let (url, _) = Hub::authorize_url(&app);
    let response = Browser::new().get(url).await;
    let page = assert_error_page(response, StatusCode::BAD_GATEWAY).await;
    assert!(page.contains("could not reach your identity provider"), "{page}");
}

#[tokio::test]
async fn a_missing_username_claim_is_refused() {
    let app = TestApp::builder(&Idp::shared().issuer).settings(|s| s.username_claim = Some("eppn".into())).spawn().await;
    let browser = Browser::new();
    let (back, _) = until_callback(&app, &browser, "ken").await;
    let page = assert_error_page(browser.deliver_callback(&app, &back).await, StatusCode::FORBIDDEN).await;
    assert!(page.contains("eppn"));
    assert_eq!(app.lineage_count().await, 0);
}
