//! Tokens for running notebooks: `min_valid`, the single-flight refresh,
//! the grace window for a rotated refresh token, and faults. The IdP is the
//! real oidc-provider (rotation on); the hub's `/hub/api/user` is mocked.

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::support::*;

struct Notebook {
    app: TestApp,
    token: String,
    user: String,
}

impl Notebook {
    /// A user logged in through the hub, with a server token the hub knows.
    async fn start(hub: &HubMock, user: &str) -> Self {
        let app = TestApp::builder(&Idp::shared().issuer).hub(hub).spawn().await;
        let (code, login) = Hub::login(&app, &Browser::new(), user).await;
        assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
        Self { app, token: hub.server_token(user).await, user: user.into() }
    }

    async fn get(&self, query: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(format!("{}{query}", self.app.url("/api/v1/tokens")))
            .header("authorization", format!("token {}", self.token))
            .send()
            .await
            .unwrap()
    }

    async fn force(&self, body: Option<Value>) -> reqwest::Response {
        let request = reqwest::Client::new()
            .post(self.app.url("/api/v1/tokens/refresh"))
            .header("authorization", format!("token {}", self.token));
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        request.send().await.unwrap()
    }

    async fn vault_refresh_token(&self) -> String {
        let lineage = self.app.state().vault.load(&self.user, &Idp::shared().issuer).await.unwrap().unwrap();
        lineage.tokens.refresh_token.unwrap().expose_secret().to_string()
    }
}

#[tokio::test]
async fn fresh_tokens_are_served_without_a_refresh() {
    let hub = HubMock::start().await;
    let nb = Notebook::start(&hub, "nina").await;
    let response = nb.get("").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"], "nina");
    assert_eq!(body["refreshed"], false);
    assert_eq!(body["refresh_token"], nb.vault_refresh_token().await.as_str());
    assert!(body["expires_in"].as_i64().unwrap() > 3000);
    assert!(body["reauth_url"].as_str().unwrap().ends_with("/refresh"));
    let fabric: Value = nb.get("?format=fabric").await.json().await.unwrap();
    assert_eq!(fabric["refresh_token"], body["refresh_token"]);
    assert_eq!(fabric["created_from"], "tokenhub");
    // A token the hub does not know, and none at all.
    let stranger = reqwest::Client::new()
        .get(nb.app.url("/api/v1/tokens"))
        .header("authorization", "token not-a-server-token")
        .send()
        .await
        .unwrap();
    assert_json_error(stranger, StatusCode::UNAUTHORIZED, "invalid_token").await;
    let anonymous = reqwest::get(nb.app.url("/api/v1/tokens")).await.unwrap();
    assert_json_error(anonymous, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert_json_error(nb.get("?min_valid=soon").await, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_json_error(nb.get("?format=yaml").await, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test]
async fn another_users_server_token_reads_only_its_own_user() {
    let hub = HubMock::start().await;
    let nb = Notebook::start(&hub, "olga").await;
    // Pat has a server token but never logged in through this tokenhub.
    let pats = hub.server_token("pat").await;
    let response = reqwest::Client::new()
        .get(nb.app.url("/api/v1/tokens"))
        .header("authorization", format!("token {pats}"))
        .send()
        .await
        .unwrap();
    let body = assert_json_error(response, StatusCode::UNAUTHORIZED, "invalid_grant").await;
    assert!(!body.to_string().contains(&nb.vault_refresh_token().await));
}

#[tokio::test]
async fn min_valid_above_the_remaining_lifetime_refreshes_once_for_100_callers() {
    let hub = HubMock::start().await;
    let nb = Notebook::start(&hub, "quinn").await;
    let before = nb.vault_refresh_token().await;
    age_lineage(&nb.app, "quinn", 1000).await;
    let refreshes = Idp::shared().refreshes("quinn").await;

    let calls = (0..100).map(|_| nb.get("?min_valid=3000"));
    let answers = futures::future::join_all(calls).await;
    let mut access_tokens = std::collections::HashSet::new();
    for response in answers {
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert!(body["expires_in"].as_i64().unwrap() >= 3000, "{body}");
        access_tokens.insert(body["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(access_tokens.len(), 1, "every caller got the same new tokens");
    assert_eq!(Idp::shared().refreshes("quinn").await - refreshes, 1, "exactly one upstream refresh");
    let after = nb.vault_refresh_token().await;
    assert_ne!(after, before, "the rotated refresh token is stored");
    let lineage = nb.app.state().vault.load("quinn", &Idp::shared().issuer).await.unwrap().unwrap();
    assert!(lineage.refreshed_at.is_some());
    assert_eq!(lineage.version, 2);

    // Asking for more than the IdP issues is capped, not refreshed again.
    let body: Value = nb.get("?min_valid=999999").await.json().await.unwrap();
    assert_eq!(body["refreshed"], false);
    assert!(body["min_valid_capped_to"].as_i64().unwrap() < 3600);
    assert_eq!(Idp::shared().refreshes("quinn").await - refreshes, 1);
}

#[tokio::test]
async fn a_just_rotated_refresh_token_gets_the_current_set() {
    let hub = HubMock::start().await;
    let nb = Notebook::start(&hub, "rosa").await;
    let old = nb.vault_refresh_token().await;
    let refreshes = Idp::shared().refreshes("rosa").await;

    let response = nb.force(Some(serde_json::json!({ "refresh_token": old }))).await;
    assert_eq!(response.status(), StatusCode::OK);
    let current: Value = response.json().await.unwrap();
    assert_eq!(Idp::shared().refreshes("rosa").await - refreshes, 1);
    assert_ne!(current["refresh_token"], old.as_str());

    // A late kernel presents the token that was just rotated away.
    let late = nb.force(Some(serde_json::json!({ "refresh_token": old }))).await;
    assert_eq!(late.status(), StatusCode::OK);
    let late: Value = late.json().await.unwrap();
    assert_eq!(late["refresh_token"], current["refresh_token"]);
    assert_eq!(late["access_token"], current["access_token"]);
    assert_eq!(Idp::shared().refreshes("rosa").await - refreshes, 1, "no upstream call for the late kernel");

    // Outside the window, or a token never issued: a clear error.
    nb.app.sql("UPDATE lineages SET rotated_at = rotated_at - 1000").await;
    let stale = nb.force(Some(serde_json::json!({ "refresh_token": old }))).await;
    assert_json_error(stale, StatusCode::BAD_REQUEST, "invalid_grant").await;
    let bogus = nb.force(Some(serde_json::json!({ "refresh_token": "never-issued" }))).await;
    assert_json_error(bogus, StatusCode::BAD_REQUEST, "invalid_grant").await;
    let garbled = reqwest::Client::new()
        .post(nb.app.url("/api/v1/tokens/refresh"))
        .header("authorization", format!("token {}", nb.token))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_json_error(garbled, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_eq!(Idp::shared().refreshes("rosa").await - refreshes, 1);
}

#[tokio::test]
async fn a_grant_killed_at_the_idp_gives_401_with_the_reauth_url() {
    let hub = HubMock::start().await;
    let nb = Notebook::start(&hub, "sam").await;
    assert!(Idp::shared().kill("sam").await >= 1);
    let response = nb.force(None).await;
    let body = assert_json_error(response, StatusCode::UNAUTHORIZED, "invalid_grant").await;
    assert_eq!(body["reauth_url"], nb.app.url("/refresh"));
    let lineage = nb.app.state().vault.load("sam", &Idp::shared().issuer).await.unwrap().unwrap();
    assert!(!lineage.active);
    assert_json_error(nb.get("").await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
}

#[tokio::test]
async fn two_replicas_on_one_database_refresh_once() {
    let hub = HubMock::start().await;
    let a = Notebook::start(&hub, "tara").await;
    let shared_db = format!("sqlite://{}?mode=rwc", a.app.db_path.display());
    let b = Notebook {
        app: TestApp::builder(&Idp::shared().issuer).hub(&hub).database(shared_db).spawn().await,
        token: a.token.clone(),
        user: "tara".into(),
    };
    age_lineage(&a.app, "tara", 1000).await;
    b.app.state().vault.forget("tara", &Idp::shared().issuer);
    let refreshes = Idp::shared().refreshes("tara").await;

    // Each replica has its own in-process lock: only the database lease
    // keeps them from refreshing twice.
    let calls = (0..40).map(|i| if i % 2 == 0 { a.get("?min_valid=3000") } else { b.get("?min_valid=3000") });
    let answers = futures::future::join_all(calls).await;
    let mut refresh_tokens = std::collections::HashSet::new();
    for response in answers {
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        refresh_tokens.insert(body["refresh_token"].as_str().unwrap().to_string());
    }
    assert_eq!(refresh_tokens.len(), 1, "both replicas hand out the same new tokens");
    assert_eq!(Idp::shared().refreshes("tara").await - refreshes, 1, "one upstream refresh across replicas");
}
