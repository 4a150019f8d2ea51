//! ID-token verification against a mock IdP (wiremock) that signs with test
//! keys, for tokens a real provider will not produce on demand.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

pub const KEY1: &str = include_str!("../fixtures/key1.pem");
pub const KEY2: &str = include_str!("../fixtures/key2.pem");
const JWK1: &str = include_str!("../fixtures/key1.jwk.json");
const JWK2: &str = include_str!("../fixtures/key2.jwk.json");
pub const ACCESS_TOKEN: &str = "mock-access-token-0123456789abcdef";

pub struct MockIdp {
    pub server: MockServer,
}

fn jwks(keys: &[&str]) -> Value {
    json!({ "keys": keys.iter().map(|k| serde_json::from_str::<Value>(k).unwrap()).collect::<Vec<_>>() })
}

impl MockIdp {
    /// A provider whose key set first holds only `k1`, then `k1` and `k2`.
    pub async fn start() -> Self {
        Self::start_with(|_| {}, false).await
    }

    /// [`MockIdp::start`] with changes to the discovery document, and with
    /// `jwks_fails_once`, a 503 from the key set between its first and
    /// second answers.
    pub async fn start_with(discovery: impl FnOnce(&mut Value), jwks_fails_once: bool) -> Self {
        let server = MockServer::start().await;
        let issuer = server.uri();
        let mut document = json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        });
        discovery(&mut document);
        Mock::given(method("GET"))
            .and(path("/.well-known/openid-configuration"))
            .respond_with(ResponseTemplate::new(200).set_body_json(document))
            .mount(&server)
            .await;
        Mock::given(path("/jwks"))
            .respond_with(ResponseTemplate::new(200).set_body_json(jwks(&[JWK1])))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        if jwks_fails_once {
            Mock::given(path("/jwks")).respond_with(ResponseTemplate::new(503)).up_to_n_times(1).mount(&server).await;
        }
        Mock::given(path("/jwks"))
            .respond_with(ResponseTemplate::new(200).set_body_json(jwks(&[JWK1, JWK2])))
            .mount(&server)
            .await;
        Self { server }
    }

    pub fn issuer(&self) -> String {
        self.server.uri()
    }

    /// Standard claims for a login with this nonce.
    pub fn claims(&self, nonce: &str) -> Value {
        let now = tokenhub::time::now();
        json!({
            "iss": self.issuer(),
            "sub": "mock-subject",
            "aud": IDP_CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            "preferred_username": "mockuser",
            "email": "mockuser@example.org",
        })
    }

    pub async fn jwks_fetches(&self) -> usize {
        let requests = self.server.received_requests().await.unwrap();
        requests.iter().filter(|r| r.url.path() == "/jwks").count()
    }
}

pub fn sign(claims: &Value, kid: &str, pem: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()).unwrap()
}

/// The refresh token the mock's login answer carries.
pub const LOGIN_REFRESH_TOKEN: &str = "mock-refresh-token-0123456789abcdef";

pub fn token_response(id_token: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "access_token": ACCESS_TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "refresh_token": LOGIN_REFRESH_TOKEN,
        "id_token": id_token,
    }))
}

/// Runs one login through tokenhub with the mock answering `token`; returns
/// tokenhub's answer to the callback.
pub async fn login_with(app: &TestApp, idp: &MockIdp, token: impl FnOnce(&str) -> ResponseTemplate) -> reqwest::Response {
    let browser = Browser::new();
    let (url, _) = Hub::authorize_url(app);
    let to_idp = location(&browser.get(url).await);
    assert!(to_idp.as_str().starts_with(&format!("{}/authorize", idp.issuer())));
    assert_eq!(query(&to_idp, "code_challenge_method").as_deref(), Some("S256"));
    assert!(query(&to_idp, "scope").unwrap().contains("offline_access"));
    let state = query(&to_idp, "state").unwrap();
    let nonce = query(&to_idp, "nonce").unwrap();
    Mock::given(method("POST")).and(path("/token")).respond_with(token(&nonce)).up_to_n_times(1).mount(&idp.server).await;
    browser.get(format!("{}?code=mock-code&state={state}", app.url("/callback"))).await
}

async fn assert_refused(app: &TestApp, response: reqwest::Response, status: StatusCode, needle: &str) {
    let page = assert_error_page(response, status).await;
    assert!(page.contains(needle), "expected {needle:?} in {page}");
    assert_eq!(app.lineage_count().await, 0, "nothing stored");
}

#[tokio::test]
async fn a_well_formed_id_token_logs_in() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    let response = login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k1", KEY1))).await;
    assert!(location(&response).as_str().starts_with(HUB_REDIRECT_URI));
    assert_eq!(app.lineage_count().await, 1);
    let lineage = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();
    assert_eq!(lineage.subject, "mock-subject");
}

#[tokio::test]
async fn bad_signature_is_refused() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    // Signed with key 2 but naming key 1.
    let response = login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k1", KEY2))).await;
    assert_refused(&app, response, StatusCode::UNAUTHORIZED, "failed verification").await;
}

#[tokio::test]
async fn alg_none_is_refused() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    let response = login_with(&app, &idp, |nonce| {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(idp.claims(nonce).to_string());
        token_response(&format!("{header}.{payload}."))
    })
    .await;
    assert_refused(&app, response, StatusCode::UNAUTHORIZED, "failed verification").await;
}

#[tokio::test]
async fn wrong_audience_expired_wrong_nonce_and_wrong_issuer_are_refused() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    type Case = (&'static str, fn(&mut Value));
    let cases: [Case; 4] = [
        ("audience", |c| c["aud"] = json!("someone-else")),
        ("expired", |c| {
            c["exp"] = json!(tokenhub::time::now() - 600);
            c["iat"] = json!(tokenhub::time::now() - 900);
        }),
        ("nonce", |c| c["nonce"] = json!("not-the-nonce")),
        ("issuer", |c| c["iss"] = json!("https://evil.example.org")),
    ];
    for (name, spoil) in cases {
        let response = login_with(&app, &idp, |nonce| {
            let mut claims = idp.claims(nonce);
            spoil(&mut claims);
            token_response(&sign(&claims, "k1", KEY1))
        })
        .await;
        let page = assert_error_page(response, StatusCode::UNAUTHORIZED).await;
        assert!(page.contains("failed verification"), "{name}: {page}");
    }
    assert_eq!(app.lineage_count().await, 0);
}

#[tokio::test]
async fn at_hash_must_match_the_access_token() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    let response = login_with(&app, &idp, |nonce| {
        let mut claims = idp.claims(nonce);
        claims["at_hash"] = json!("AAAAAAAAAAAAAAAAAAAAAA");
        token_response(&sign(&claims, "k1", KEY1))
    })
    .await;
    assert_refused(&app, response, StatusCode::UNAUTHORIZED, "at_hash").await;
}

#[tokio::test]
async fn unknown_kid_fetches_the_key_set_again_but_not_too_often() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    // Key 2 is not in the key set tokenhub discovered; the re-fetch has it.
    let response = login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k2", KEY2))).await;
    assert!(location(&response).as_str().starts_with(HUB_REDIRECT_URI));
    assert_eq!(idp.jwks_fetches().await, 2);
    // Another unknown key right after: refused without a third fetch.
    let response = login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k3", KEY2))).await;
    assert_error_page(response, StatusCode::UNAUTHORIZED).await;
    assert_eq!(idp.jwks_fetches().await, 2, "re-fetch is rate-limited");
}

#[tokio::test]
async fn token_endpoint_faults_give_clear_pages() {
    let idp = MockIdp::start().await;
    let app = TestApp::builder(&idp.issuer()).spawn().await;
    let response = login_with(&app, &idp, |_| ResponseTemplate::new(500).set_body_string("boom")).await;
    assert_refused(&app, response, StatusCode::BAD_GATEWAY, "Identity provider").await;
    let response = login_with(&app, &idp, |_| {
        ResponseTemplate::new(200).insert_header("content-type", "application/json").set_body_string("{not json")
    })
    .await;
    assert_refused(&app, response, StatusCode::BAD_GATEWAY, "Identity provider").await;
    let response = login_with(&app, &idp, |_| {
        ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant", "error_description": "code used"}))
    })
    .await;
    assert_refused(&app, response, StatusCode::BAD_REQUEST, "Sign-in expired").await;
    let response = login_with(&app, &idp, |_| {
        ResponseTemplate::new(200).set_body_json(json!({"access_token": ACCESS_TOKEN, "token_type": "Bearer"}))
    })
    .await;
    assert_refused(&app, response, StatusCode::BAD_GATEWAY, "id_token").await;
}
