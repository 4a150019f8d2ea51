//! Every class of answer an IdP's token endpoint gives a refresh, and a key
//! set that fails or hangs after a rollover, against wiremock (the faults a
//! real provider does not make on demand): the lineage's state, what the
//! caller gets, how many requests reach the IdP and how far apart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

use crate::id_token::{KEY2, LOGIN_REFRESH_TOKEN, MockIdp, login_with, sign, token_response};
use crate::refresh_safety::{Caller, refresh_reply, refreshed_claims};
use crate::support::*;

/// A canned answer that notes when each request came.
#[derive(Clone)]
struct Timed {
    answer: ResponseTemplate,
    at: Arc<Mutex<Vec<Instant>>>,
}

impl Respond for Timed {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.at.lock().unwrap().push(Instant::now());
        self.answer.clone()
    }
}

/// A signed-in user whose every refresh the IdP answers with `answer`.
struct Setup {
    idp: MockIdp,
    /// Kept: a dropped mock server goes back to wiremock's pool, reset.
    hub: HubMock,
    app: TestApp,
    caller: Caller,
    at: Arc<Mutex<Vec<Instant>>>,
}

async fn setup(answer: ResponseTemplate) -> Setup {
    let idp = MockIdp::start_with(|_| {}, false).await;
    let hub = HubMock::start().await;
    let app = TestApp::builder(&idp.issuer()).hub(&hub).spawn().await;
    assert!(login_with(&app, &idp, |nonce| token_response(&sign_login(&idp, nonce))).await.status().is_redirection());
    let caller = Caller::new(&app, &hub, "mockuser").await;
    let at = Arc::new(Mutex::new(Vec::new()));
    Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/token"))
        .and(wiremock::matchers::body_string_contains(format!("refresh_token={LOGIN_REFRESH_TOKEN}")))
        .respond_with(Timed { answer, at: at.clone() })
        .mount(&idp.server)
        .await;
    Setup { idp, hub, app, caller, at }
}

fn sign_login(idp: &MockIdp, nonce: &str) -> String {
    sign(&idp.claims(nonce), "k1", crate::id_token::KEY1)
}

fn oauth_error(status: u16, error: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"error": error, "error_description": format!("the test IdP says {error}")}))
}

impl Setup {
    async fn lineage(&self) -> tokenhub::vault::Lineage {
        self.app.state().vault.load("mockuser", &self.idp.issuer()).await.unwrap().unwrap()
    }

    fn requests(&self) -> Vec<Instant> {
        self.at.lock().unwrap().clone()
    }

    /// A forced refresh: status, `Retry-After` and body.
    async fn force(&self) -> (StatusCode, Option<u64>, Value) {
        let response = self.caller.force().await;
        let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
        (response.status(), retry, response.json().await.unwrap())
    }
}

/// Each OAuth refusal of the refresh token (RFC 6749 §5.2) kills the
/// lineage with the IdP's words as the reason; the caller gets 401 with
/// `reauth_url`, and the dead token is never sent again.
#[tokio::test]
async fn a_refusal_of_the_refresh_token_is_a_dead_lineage_with_the_idps_reason() {
    for error in ["invalid_grant", "invalid_request", "invalid_scope"] {
        let s = setup(oauth_error(400, error)).await;
        let (status, _, body) = s.force().await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}: {body}");
        assert_eq!(body["error"], "invalid_grant", "{error}");
        assert!(body["reauth_url"].as_str().unwrap().ends_with("/refresh"));
        let lineage = s.lineage().await;
        assert!(!lineage.active, "{error}: dead");
        let reason = lineage.dead_reason.unwrap();
        assert!(reason.contains(error) && reason.contains("the test IdP says"), "{reason}");
        // Called again: 401 at once, nothing sent.
        assert_eq!(s.force().await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(s.requests().len(), 1, "{error}: the refused token was sent once");
    }
}

/// `invalid_client` and `unauthorized_client` refuse tokenhub's own
/// client: the lineage is kept, the caller gets a clear 503, the operators
/// an error in the log and in /metrics; no retry.
#[tokio::test]
async fn a_refused_client_keeps_the_lineage_and_tells_the_operators() {
    for (status, error) in [(401, "invalid_client"), (400, "unauthorized_client")] {
        let s = setup(oauth_error(status, error)).await;
        let (answer, _, body) = s.force().await;
        assert_eq!(answer, StatusCode::SERVICE_UNAVAILABLE, "{error}: {body}");
        assert!(body["error_description"].as_str().unwrap().contains("registration"), "{body}");
        assert!(s.lineage().await.active, "{error}: kept");
        assert_eq!(s.requests().len(), 1, "{error}: not retried");
        let metrics = reqwest::get(s.app.url("/metrics")).await.unwrap().text().await.unwrap();
        assert!(metrics.contains("tokenhub_upstream_refreshes_total{outcome=\"misconfigured\"} 1"), "{metrics}");
    }
    assert!(logs().contains("the identity provider refused tokenhub's client at its token endpoint"));
}

/// Outages (5xx, 429, `temporarily_unavailable`) keep the lineage and are
/// retried twice, 0.25 s then 0.5 s apart, or as far apart as a short
/// `Retry-After` asks.
#[tokio::test]
async fn an_outage_is_retried_with_backoff_or_as_the_idp_asks() {
    let cases = [
        (ResponseTemplate::new(500), Duration::from_millis(250), Duration::from_millis(500), None),
        (oauth_error(400, "temporarily_unavailable"), Duration::from_millis(250), Duration::from_millis(500), None),
        (ResponseTemplate::new(503).insert_header("retry-after", "1"), Duration::from_secs(1), Duration::from_secs(1), Some(1)),
        (ResponseTemplate::new(429).insert_header("retry-after", "2"), Duration::from_secs(2), Duration::from_secs(2), Some(2)),
    ];
    for (answer, first, second, said) in cases {
        let s = setup(answer).await;
        let (status, retry, body) = s.force().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "temporarily_unavailable");
        assert!(retry.is_some(), "Retry-After is sent");
        assert!(s.lineage().await.active);
        let at = s.requests();
        assert_eq!(at.len(), 3, "three attempts");
        assert!(at[1] - at[0] >= first, "{:?} then {first:?} asked", at[1] - at[0]);
        assert!(at[2] - at[1] >= second, "{:?} then {second:?} asked", at[2] - at[1]);
        assert!(at[2] - at[0] < first + second + Duration::from_secs(1), "no longer than asked");
        if let Some(said) = said {
            assert!(retry.unwrap() <= said, "the caller is told the IdP's wait: {retry:?}");
        }
    }
}

/// A long `Retry-After` ends the attempts at once: the caller gets it, and
/// nothing is sent to the IdP before it is over.
#[tokio::test]
async fn a_long_retry_after_is_kept_to_and_passed_on() {
    let s = setup(ResponseTemplate::new(503).insert_header("retry-after", "30")).await;
    let started = Instant::now();
    let (status, retry, _) = s.force().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(2), "not waited out inline");
    assert!((29..=30).contains(&retry.unwrap()), "{retry:?}");
    for _ in 0..3 {
        let (status, retry, _) = s.force().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!((27..=30).contains(&retry.unwrap()), "{retry:?}");
    }
    assert_eq!(s.requests().len(), 1, "nothing sent while the IdP asked to wait");
    assert!(s.lineage().await.active);
}

/// A 4xx that is no OAuth error (a proxy's page, a wrong URL) says
/// nothing about the grant: kept, 503, not retried.
#[tokio::test]
async fn a_4xx_without_an_oauth_error_keeps_the_lineage() {
    let s = setup(ResponseTemplate::new(404).set_body_string("<html>not found</html>")).await;
    let (status, _, _) = s.force().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(s.lineage().await.active);
    assert_eq!(s.requests().len(), 1);
}

/// A token endpoint that does not answer within the HTTP timeout (15 s):
/// tried three times, then 503; the lineage is kept.
#[tokio::test]
async fn a_token_endpoint_that_hangs_is_an_outage() {
    let s = setup(ResponseTemplate::new(200).set_delay(Duration::from_secs(20))).await;
    let (status, _, _) = s.force().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(s.lineage().await.active);
    assert_eq!(s.requests().len(), 3);
}

/// After a rollover the key set fails (503 with `Retry-After`) or hangs
/// while 20 callers arrive: one fetch, no caller waits longer than one
/// fetch's timeout (5 s), and a `Retry-After` longer than the usual pause
/// is kept to.
#[tokio::test]
async fn a_failing_or_hanging_key_set_is_fetched_once_and_holds_no_caller_up() {
    for hang in [false, true] {
        let s = setup(refresh_reply("access-2", "refresh-2", None)).await;
        s.idp.server.reset().await;
        // (The reset dropped the discovery and the login's key set; tokenhub
        // has both. The refresh now brings an ID token under a new key.)
        let new_id_token = sign(&refreshed_claims(&s.idp), "k2", KEY2);
        Mock::given(wiremock::matchers::path("/token"))
            .respond_with(refresh_reply("access-2", "refresh-2", Some(new_id_token)))
            .mount(&s.idp.server)
            .await;
        let key_set = if hang {
            ResponseTemplate::new(200).set_delay(Duration::from_secs(30))
        } else {
            ResponseTemplate::new(503).insert_header("retry-after", "20")
        };
        Mock::given(wiremock::matchers::path("/jwks")).respond_with(key_set).mount(&s.idp.server).await;

        let calls = (0..20).map(|_| async {
            let started = Instant::now();
            let status = s.caller.force().await.status();
            (status, started.elapsed())
        });
        let answers = futures::future::join_all(calls).await;
        for (status, took) in &answers {
            // The login's ID token is still valid: served beside the new tokens.
            assert_eq!(*status, StatusCode::OK);
            assert!(*took < Duration::from_secs(7), "a caller waited {took:?}");
        }
        let fetches = async || s.idp.server.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/jwks").count();
        assert_eq!(fetches().await, 1, "hang={hang}: one fetch for 20 callers");
        if !hang {
            // Past tokenhub's own 5 s pause, within the IdP's 20 s.
            tokio::time::sleep(Duration::from_secs(6)).await;
            let again = s.caller.get("").await;
            assert_eq!(again.status(), StatusCode::OK, "{}", again.text().await.unwrap());
            assert_eq!(fetches().await, 1, "Retry-After: 20 is kept to");
        }
        assert!(s.lineage().await.pending_id_token.is_some(), "the new ID token waits");
    }
}

/// A caller that gives up (its connection closed) while the IdP is slow to
/// answer its refresh: the refresh goes on and its answer is stored (the
/// refresh token it replaced may be spent), and the next caller gets the
/// new tokens without another refresh.
#[tokio::test]
async fn a_caller_that_goes_away_mid_refresh_loses_nothing() {
    use secrecy::ExposeSecret as _;
    let s = setup(refresh_reply("access-2", "refresh-2", None).set_delay(Duration::from_secs(2))).await;
    let token = s.hub.server_token("mockuser").await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let request = impatient.post(s.app.url("/api/v1/tokens/refresh")).header("authorization", format!("token {token}"));
    assert!(request.send().await.is_err(), "the caller gave up");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lineage = s.lineage().await;
    assert_eq!(lineage.tokens.refresh_token.as_ref().unwrap().expose_secret(), "refresh-2", "the IdP's answer was stored");
    let body: Value = s.caller.get("").await.json().await.unwrap();
    assert_eq!(body["refresh_token"], "refresh-2");
    assert_eq!(s.requests().len(), 1, "one refresh at the IdP");
}
