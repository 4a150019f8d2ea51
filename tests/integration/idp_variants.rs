//! Where identity providers differ: the nonce of refreshed ID tokens,
//! booleans sent as strings, client authentication (Basic with RFC 6749
//! §2.3.1 encoding, or post), and providers that issue a refresh token only
//! when consent was asked for.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokenhub::config::ClientAuthMethod;
use wiremock::Mock;
use wiremock::matchers::{method, path};

use crate::id_token::{KEY1, MockIdp, login_with, sign, token_response};
use crate::refresh_safety::{Caller, refresh_reply, refreshed_claims};
use crate::support::*;

#[tokio::test]
async fn a_refreshed_id_token_with_another_nonce_is_refused_and_the_refresh_kept() {
    let idp = MockIdp::start().await;
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer()).hub(&hub).spawn().await;
    login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k1", KEY1))).await;
    let caller = Caller::new(&app, &hub, "mockuser").await;
    let login_id_token = caller.get("").await.json::<Value>().await.unwrap()["id_token"].clone();

    let foreign = sign(&idp.claims("a-nonce-of-another-login"), "k1", KEY1);
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(refresh_reply("access-2", "refresh-2", Some(foreign)))
        .up_to_n_times(1)
        .mount(&idp.server)
        .await;
    let body: Value = caller.force().await.json().await.unwrap();
    assert_eq!(body["id_token"], login_id_token, "the ID token with the wrong nonce is not handed out");
    assert_eq!(body["refresh_token"], "refresh-2", "the new refresh token is kept");
    let lineage = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();
    assert!(lineage.active && lineage.pending_id_token.is_none());
    assert!(logs().contains("refreshed ID token refused"));

    // Without a nonce (what most providers send on refresh) it is accepted.
    let without_nonce = sign(&refreshed_claims(&idp), "k1", KEY1);
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(refresh_reply("access-3", "refresh-3", Some(without_nonce.clone())))
        .mount(&idp.server)
        .await;
    let body: Value = caller.force().await.json().await.unwrap();
    assert_eq!(body["id_token"], without_nonce.as_str());
}

#[tokio::test]
async fn booleans_sent_as_strings_are_accepted_and_become_booleans() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    let response = login_with(&app, &idp, |nonce| {
        let mut claims = idp.claims(nonce);
        claims["email_verified"] = json!("true");
        claims["phone_number_verified"] = json!("false");
        token_response(&sign(&claims, "k1", KEY1))
    })
    .await;
    assert!(location(&response).as_str().starts_with(HUB_REDIRECT_URI), "the login succeeds");
    let lineage = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();
    assert_eq!(lineage.claims["email_verified"], json!(true));
    assert_eq!(lineage.claims["phone_number_verified"], json!(false));
}

#[tokio::test]
async fn client_secret_post_is_chosen_from_discovery() {
    let idp = MockIdp::start_with(|d| d["token_endpoint_auth_methods_supported"] = json!(["client_secret_post"]), false).await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    let response = login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k1", KEY1))).await;
    assert!(location(&response).as_str().starts_with(HUB_REDIRECT_URI));
    let requests = idp.server.received_requests().await.unwrap();
    let token_request = requests.iter().find(|r| r.url.path() == "/token").unwrap();
    assert!(!token_request.headers.contains_key("authorization"));
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&token_request.body).into_owned().collect();
    assert!(form.contains(&("client_id".into(), IDP_CLIENT_ID.into())));
    assert!(form.contains(&("client_secret".into(), IDP_CLIENT_SECRET.into())));
}

/// Logs in through the shared oidc-provider as `client_id`, then refreshes
/// through the notebook API and revokes at the IdP, all with `auth`.
async fn login_refresh_revoke(client_id: &str, secret: &str, auth: Option<ClientAuthMethod>, user: &str) {
    let hub = HubMock::start().await;
    let app = TestApp::builder(&Idp::shared().issuer)
        .hub(&hub)
        .settings(|s| {
            s.oidc_client_id = Some(client_id.into());
            s.oidc_client_secret = Some(secret.into());
            s.oidc_client_auth_method = auth;
        })
        .spawn()
        .await;
    let (code, login) = Hub::login(&app, &Browser::new(), user).await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    let caller = Caller::new(&app, &hub, user).await;
    let before = caller.get("").await.json::<Value>().await.unwrap()["refresh_token"].clone();
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK, "the IdP accepted the refresh");
    let body: Value = response.json().await.unwrap();
    assert_ne!(body["refresh_token"], before);
    // Revocation authenticates the same way: the IdP accepts it, and the
    // revoked token no longer refreshes.
    let refresh_token = body["refresh_token"].as_str().unwrap();
    assert!(app.state().upstream.revoke(refresh_token).await.unwrap(), "the IdP revoked it");
    let response = caller.force().await;
    assert_json_error(response, StatusCode::UNAUTHORIZED, "invalid_grant").await;
}

#[tokio::test]
async fn client_secret_post_works_against_a_client_registered_for_it() {
    login_refresh_revoke("tokenhub-post", "tokenhub-post-secret", Some(ClientAuthMethod::ClientSecretPost), "posy").await;
}

#[tokio::test]
async fn a_secret_full_of_symbols_survives_basic_authentication() {
    // Sent as RFC 6749 §2.3.1 says (form-encoded, then Basic); the IdP decodes it the same way.
    login_refresh_revoke("tokenhub-symbols", "sec+ret~with/sym=bols:%20&x", None, "symon").await;
}

/// A provider in its spec-strict mode: a refresh token only for
/// `offline_access`, which it grants only with `prompt=consent`.
fn strict_idp() -> Idp {
    Idp::start(&[("IDP_STRICT_OFFLINE", "1")])
}

#[tokio::test]
async fn with_prompt_consent_set_a_strict_provider_issues_a_refresh_token() {
    let idp = strict_idp();
    let hub = HubMock::start().await;
    let app =
        TestApp::builder(&idp.issuer).hub(&hub).settings(|s| s.oidc_auth_params = Some("prompt=consent".into())).spawn().await;
    let browser = Browser::new();
    let to_idp = location(&browser.get(Hub::authorize_url(&app).0).await);
    assert_eq!(query(&to_idp, "prompt").as_deref(), Some("consent"));
    let (code, login) = Hub::login_at(&app, &idp, &browser, "constance").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    let lineage = app.state().vault.load("constance", &idp.issuer).await.unwrap().unwrap();
    assert!(lineage.tokens.refresh_token.is_some(), "the login brought a refresh token");
    let caller = Caller::new(&app, &hub, "constance").await;
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["refreshed"], true);
}

#[tokio::test]
async fn without_the_setting_tokenhub_asks_for_consent_once_by_itself() {
    let idp = strict_idp();
    let app = TestApp::builder(&idp.issuer).spawn().await;
    let browser = Browser::new();
    let (url, login) = Hub::authorize_url(&app);
    let to_idp = location(&browser.get(url).await);
    assert_eq!(query(&to_idp, "prompt"), None, "a first sign-in does not ask for consent up front");
    let back = browser.sign_in_at_idp(to_idp, "carla").await;
    // No refresh token came: tokenhub goes back once with prompt=consent.
    let again = location(&browser.deliver_callback(&app, &back).await);
    assert!(again.as_str().starts_with(&format!("{}/auth", idp.issuer)), "{again}");
    assert_eq!(query(&again, "prompt").as_deref(), Some("consent"));
    let back = browser.sign_in_at_idp(again, "carla").await;
    let to_hub = location(&browser.deliver_callback(&app, &back).await);
    assert!(to_hub.as_str().starts_with(HUB_REDIRECT_URI));
    assert_eq!(query(&to_hub, "state").as_deref(), Some(login.state.as_str()));
    let lineage = app.state().vault.load("carla", &idp.issuer).await.unwrap().unwrap();
    assert!(lineage.tokens.refresh_token.is_some());
}

#[tokio::test]
async fn a_silent_renewal_does_not_ask_for_consent_and_says_no_refresh_token_came() {
    let idp = strict_idp();
    let app = TestApp::builder(&idp.issuer).spawn().await;
    let browser = Browser::new();
    // /refresh without a session: a new login at the IdP, kept silent.
    let to_idp = location(&browser.get(app.url("/refresh")).await);
    assert_eq!(query(&to_idp, "prompt"), None);
    let back = browser.sign_in_at_idp(to_idp, "silas").await;
    let response = browser.deliver_callback(&app, &back).await;
    assert_eq!(response.status(), StatusCode::OK, "the renewal page, not another trip to the IdP");
    let lineage = app.state().vault.load("silas", &idp.issuer).await.unwrap().unwrap();
    assert!(lineage.tokens.refresh_token.is_none());
    assert!(logs().contains("the login brought no refresh token"));
    let page = browser
        .http
        .get(app.url("/"))
        .header("sec-fetch-mode", "navigate")
        .header("sec-fetch-dest", "document")
        .header("sec-fetch-site", "none")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"no-refresh-token\""), "{page}");
}
