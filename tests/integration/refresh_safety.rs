//! The refresh invariant: once the IdP's token endpoint has answered 2xx, the
//! refresh token it replaced is never sent again, and nothing that fails
//! afterwards (the key set, the ID-token check, the database, the answer's
//! body) loses the new tokens or kills the lineage.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::id_token::{KEY1, KEY2, LOGIN_REFRESH_TOKEN, MockIdp, login_with, sign, token_response};
use crate::support::*;

/// A notebook's calls to tokenhub with its server token.
pub struct Caller {
    url: String,
    pub token: String,
}

impl Caller {
    pub async fn new(app: &TestApp, hub: &HubMock, user: &str) -> Self {
        Self { url: app.url("/api/v1/tokens"), token: hub.server_token(user).await }
    }

    pub async fn get(&self, query: &str) -> reqwest::Response {
        let url = format!("{}{query}", self.url);
        reqwest::Client::new().get(url).header("authorization", format!("token {}", self.token)).send().await.unwrap()
    }

    pub async fn force(&self) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/refresh", self.url))
            .header("authorization", format!("token {}", self.token))
            .send()
            .await
            .unwrap()
    }
}

fn jwt_header(jwt: &str) -> Value {
    use base64::Engine as _;
    let part = jwt.split('.').next().unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

pub fn refresh_reply(access: &str, refresh: &str, id_token: Option<String>) -> ResponseTemplate {
    let mut body = json!({ "access_token": access, "token_type": "Bearer", "expires_in": 300, "refresh_token": refresh });
    if let Some(id_token) = id_token {
        body["id_token"] = json!(id_token);
    }
    ResponseTemplate::new(200).set_body_json(body)
}

/// Claims of a refreshed ID token: like the login's, without a nonce.
pub fn refreshed_claims(idp: &MockIdp) -> Value {
    let mut claims = idp.claims("unused");
    claims.as_object_mut().unwrap().remove("nonce");
    claims
}

/// The token endpoint's answer to a refresh with `refresh_token` (the
/// caller says what it answers, and how often).
fn refresh_of(refresh_token: &str) -> wiremock::MockBuilder {
    Mock::given(method("POST")).and(path("/token")).and(body_string_contains(format!("refresh_token={refresh_token}")))
}

async fn token_requests_with(idp: &MockIdp, needle: &str) -> usize {
    let requests = idp.server.received_requests().await.unwrap();
    requests.iter().filter(|r| r.url.path() == "/token" && String::from_utf8_lossy(&r.body).contains(needle)).count()
}

/// The real oidc-provider rolls its signing key; its key set answers 503
/// exactly when tokenhub fetches it after a 200 refresh.
#[tokio::test]
async fn a_key_rollover_with_the_key_set_down_keeps_the_new_tokens() {
    let idp = Idp::start(&[]);
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer).hub(&hub).spawn().await;
    let (code, login) = Hub::login_at(&app, &idp, &Browser::new(), "rolf").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    let caller = Caller::new(&app, &hub, "rolf").await;
    let vault = &app.state().vault;
    let before = vault.load("rolf", &idp.issuer).await.unwrap().unwrap();
    let old_kid = jwt_header(before.tokens.id_token.expose_secret())["kid"].clone();

    idp.restart(&[("IDP_ROLL_KEY", "1")]);
    idp.fail_jwks(1).await;
    // The refresh is answered 200 with an ID token under the new key; the
    // key set is down. The last verified ID token is still valid: served.
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let after_first = vault.load("rolf", &idp.issuer).await.unwrap().unwrap();
    assert!(after_first.active, "the lineage survives");
    assert!(after_first.pending_id_token.is_some(), "the new ID token waits to be verified");
    let rt1 = after_first.tokens.refresh_token.as_ref().unwrap().expose_secret().to_string();
    assert_ne!(
        Some(rt1.as_str()),
        before.tokens.refresh_token.as_ref().map(|t| t.expose_secret()),
        "the new refresh token is stored"
    );
    assert_eq!(body["refresh_token"], rt1.as_str());
    assert_eq!(body["id_token"], before.tokens.id_token.expose_secret(), "only a verified ID token is handed out");

    // The key set answers again: once tokenhub's pause after a failed fetch
    // (5 s) is over, the next call verifies and serves the new ID token.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let body: Value = caller.get("").await.json().await.unwrap();
    let new_kid = jwt_header(body["id_token"].as_str().unwrap())["kid"].clone();
    assert_ne!(new_kid, old_kid, "the ID token under the new key is served");
    assert!(vault.load("rolf", &idp.issuer).await.unwrap().unwrap().pending_id_token.is_none());

    // And the stored refresh token is the one the IdP accepts.
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK);
    let stats = idp.stats().await;
    assert_eq!(stats["refresh_token"], 2, "{stats}");
    assert_eq!(stats["refresh_token_error"], 0, "no consumed refresh token was sent again: {stats}");
}

/// The key set is down when the new ID token arrives and the last verified
/// one has expired: 503 with Retry-After, then the new set once it is back.
#[tokio::test]
async fn an_unverifiable_id_token_is_not_handed_out_and_nothing_is_lost() {
    let idp = MockIdp::start_with(|_| {}, true).await;
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer()).hub(&hub).spawn().await;
    login_with(&app, &idp, |nonce| {
        let mut claims = idp.claims(nonce);
        claims["exp"] = json!(tokenhub::time::now() + 2);
        token_response(&sign(&claims, "k1", KEY1))
    })
    .await;
    let caller = Caller::new(&app, &hub, "mockuser").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the login's ID token expires
    let new_id_token = sign(&refreshed_claims(&idp), "k2", KEY2);
    refresh_of(LOGIN_REFRESH_TOKEN)
        .respond_with(refresh_reply("access-2", "refresh-2", Some(new_id_token.clone())))
        .up_to_n_times(1)
        .mount(&idp.server)
        .await;
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let lineage = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();
    assert!(lineage.active);
    assert_eq!(lineage.tokens.refresh_token.unwrap().expose_secret(), "refresh-2", "stored before the check");
    // While tokenhub pauses after the failed fetch (5 s), callers learn
    // "not yet" without fetching the key set again.
    let fetched = idp.server.received_requests().await.unwrap().iter().filter(|r| r.url.path().ends_with("jwks")).count();
    for _ in 0..5 {
        assert_eq!(caller.get("").await.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let again = idp.server.received_requests().await.unwrap().iter().filter(|r| r.url.path().ends_with("jwks")).count();
    assert_eq!(again, fetched, "the key set is not fetched once per call while it fails");
    tokio::time::sleep(Duration::from_secs(5)).await;

    let response = caller.get("").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id_token"], new_id_token.as_str());
    assert_eq!(body["access_token"], "access-2");

    refresh_of("refresh-2").respond_with(refresh_reply("access-3", "refresh-3", None)).mount(&idp.server).await;
    let body: Value = caller.force().await.json().await.unwrap();
    assert_eq!(body["refresh_token"], "refresh-3");
    assert_eq!(
        token_requests_with(&idp, "refresh_token=mock-refresh-token").await,
        1,
        "a spent refresh token is never sent again"
    );
}

/// The key set changes twice within tokenhub's re-fetch limit: the ID token
/// waits, the refresh token it came with is kept and used next.
#[tokio::test]
async fn two_key_rollovers_in_a_row_keep_the_refresh_token() {
    let idp = MockIdp::start().await;
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer()).hub(&hub).spawn().await;
    login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k1", KEY1))).await;
    let caller = Caller::new(&app, &hub, "mockuser").await;
    // First rollover: k2, fetched again and verified.
    let id_k2 = sign(&refreshed_claims(&idp), "k2", KEY2);
    refresh_of(LOGIN_REFRESH_TOKEN)
        .respond_with(refresh_reply("access-2", "refresh-2", Some(id_k2.clone())))
        .up_to_n_times(1)
        .mount(&idp.server)
        .await;
    let body: Value = caller.force().await.json().await.unwrap();
    assert_eq!(body["id_token"], id_k2.as_str());
    // Second, moments later: a key id the key set cannot have yet.
    refresh_of("refresh-2")
        .respond_with(refresh_reply("access-3", "refresh-3", Some(sign(&refreshed_claims(&idp), "k3", KEY2))))
        .up_to_n_times(1)
        .mount(&idp.server)
        .await;
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK, "the last verified ID token is still valid");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["refresh_token"], "refresh-3");
    assert_eq!(body["id_token"], id_k2.as_str());
    assert_eq!(idp.jwks_fetches().await, 2, "the re-fetch stays rate-limited");
    refresh_of("refresh-3").respond_with(refresh_reply("access-4", "refresh-4", None)).mount(&idp.server).await;
    let body: Value = caller.force().await.json().await.unwrap();
    assert_eq!(body["refresh_token"], "refresh-4");
    assert_eq!(token_requests_with(&idp, "refresh_token=refresh-2").await, 1);
}

/// A token endpoint whose 200 stalls in the middle of its body (after
/// answering the login's code exchange in full): the refresh is not
/// repeated, the lineage is kept, the caller gets 503.
#[tokio::test]
async fn a_200_whose_body_times_out_is_not_sent_again() {
    let stalls = Arc::new(AtomicUsize::new(0));
    let canned: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_endpoint = format!("http://{}/token", listener.local_addr().unwrap());
    let (counter, next_body) = (stalls.clone(), canned.clone());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let body = next_body.lock().unwrap().take();
            if body.is_none() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            tokio::spawn(async move {
                let mut buffer = [0u8; 8192];
                let _ = socket.read(&mut buffer).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n";
                match body {
                    Some(body) => {
                        let answer = format!("{head}content-length: {}\r\n\r\n{body}", body.len());
                        let _ = socket.write_all(answer.as_bytes()).await;
                    }
                    None => {
                        let _ = socket
                            .write_all(format!("{head}content-length: 400\r\n\r\n{{\"access_token\":\"acc").as_bytes())
                            .await;
                        tokio::time::sleep(Duration::from_secs(40)).await;
                    }
                }
            });
        }
    });
    let idp = MockIdp::start_with(|d| d["token_endpoint"] = json!(token_endpoint), false).await;
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer()).hub(&hub).spawn().await;
    let browser = Browser::new();
    let to_idp = location(&browser.get(Hub::authorize_url(&app).0).await);
    let (nonce, state) = (query(&to_idp, "nonce").unwrap(), query(&to_idp, "state").unwrap());
    let login_answer = json!({
        "access_token": "access-1", "token_type": "Bearer", "expires_in": 300,
        "refresh_token": "refresh-1", "id_token": sign(&idp.claims(&nonce), "k1", KEY1),
    });
    *canned.lock().unwrap() = Some(login_answer.to_string());
    let response = browser.get(format!("{}?code=c&state={state}", app.url("/callback"))).await;
    assert!(location(&response).as_str().starts_with(HUB_REDIRECT_URI));
    let caller = Caller::new(&app, &hub, "mockuser").await;
    let before = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();

    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(stalls.load(Ordering::SeqCst), 1, "a 2xx that never finished is not sent again");
    let after = app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().unwrap();
    assert!(after.active, "the lineage survives");
    assert_eq!(after.version, before.version);
    // Still-valid tokens keep being served.
    let body: Value = caller.get("").await.json().await.unwrap();
    assert_eq!(body["access_token"], "access-1");
}

/// The database refuses to store the IdP's answer: the answer is held in
/// memory and stored by the next caller; the spent refresh token is never
/// served or sent again.
#[tokio::test]
async fn a_database_failure_after_the_idp_answered_keeps_the_new_tokens() {
    let hub = HubMock::start().await;
    let app = TestApp::builder(&Idp::shared().issuer).hub(&hub).spawn().await;
    let (code, login) = Hub::login(&app, &Browser::new(), "dora").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    let caller = Caller::new(&app, &hub, "dora").await;
    let spent = caller.get("").await.json::<Value>().await.unwrap()["refresh_token"].clone();
    let refreshes = Idp::shared().refreshes("dora").await;

    app.sql(
        "CREATE TRIGGER injected_fault BEFORE UPDATE ON lineages \
         WHEN NEW.refreshed_at IS NOT OLD.refreshed_at \
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
    )
    .await;
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(Idp::shared().refreshes("dora").await - refreshes, 1, "the IdP answered");
    // The refresh token in the database is spent now: it is not served.
    assert_eq!(caller.get("").await.status(), StatusCode::SERVICE_UNAVAILABLE);

    app.sql("DROP TRIGGER injected_fault").await;
    let response = caller.get("").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_ne!(body["refresh_token"], spent, "the held answer was stored and served");
    assert_eq!(Idp::shared().refreshes("dora").await - refreshes, 1, "without another refresh");
    let stored = app.state().vault.load("dora", &Idp::shared().issuer).await.unwrap().unwrap();
    assert_eq!(body["refresh_token"], stored.tokens.refresh_token.unwrap().expose_secret());

    // The IdP (rotation on, reuse refused) accepts the stored refresh token.
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(Idp::shared().refreshes("dora").await - refreshes, 2);
}

/// A revoke while a refresh is at the IdP waits for it, then revokes the
/// refresh token that refresh brought: an IdP that revokes single tokens
/// (not the whole grant) would otherwise keep the newest one valid, with
/// nothing left in tokenhub to revoke it by.
#[tokio::test]
async fn a_revoke_during_a_refresh_revokes_the_token_that_refresh_brought() {
    let idp =
        MockIdp::start_with(|d| d["revocation_endpoint"] = json!(format!("{}/revoke", d["issuer"].as_str().unwrap())), false)
            .await;
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer()).hub(&hub).spawn().await;
    login_with(&app, &idp, |nonce| token_response(&sign(&idp.claims(nonce), "k1", KEY1))).await;
    refresh_of(LOGIN_REFRESH_TOKEN)
        .respond_with(refresh_reply("access-after-refresh", "refresh-after-refresh", None).set_delay(Duration::from_secs(2)))
        .mount(&idp.server)
        .await;
    Mock::given(method("POST")).and(path("/revoke")).respond_with(ResponseTemplate::new(200)).mount(&idp.server).await;

    let caller = Caller::new(&app, &hub, "mockuser").await;
    let refresh = tokio::spawn(async move { caller.force().await.status() });
    tokio::time::sleep(Duration::from_millis(500)).await; // the refresh is waiting for the IdP
    let revoked = app.state().refresher.revoke(app.state(), "mockuser").await.unwrap().expect("a lineage was revoked");
    assert_eq!(refresh.await.unwrap(), StatusCode::OK, "the refresh finished first");
    assert_eq!(revoked.idp, tokenhub::tokens::revoke::IdpRevocation::Revoked);
    assert_eq!(revoked.version, 2, "the version the refresh stored");

    let requests = idp.server.received_requests().await.unwrap();
    let revocations: Vec<String> =
        requests.iter().filter(|r| r.url.path() == "/revoke").map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    assert_eq!(revocations.len(), 1);
    assert!(revocations[0].contains("token=refresh-after-refresh"), "the newest refresh token is revoked");
    assert!(app.state().vault.load("mockuser", &idp.issuer()).await.unwrap().is_none(), "nothing stored after the revoke");
}
