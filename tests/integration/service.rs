//! Operational endpoints, driven in-process through the router.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::support::*;

async fn call(app: &TestApp, uri: &str) -> (StatusCode, String) {
    let response =
        tokenhub::app(app.state().clone()).oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn healthz_metrics_discovery_and_unknown_paths() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let (status, body) = call(&app, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "ok");

    let (status, body) = call(&app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("tokenhub_logins_total 0"), "{body}");

    let (status, body) = call(&app, "/.well-known/openid-configuration").await;
    assert_eq!(status, StatusCode::OK);
    let discovery: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(discovery["issuer"], app.base.as_str());
    assert_eq!(discovery["code_challenge_methods_supported"], serde_json::json!(["S256"]));

    let (status, body) = call(&app, "/no/such/thing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "not_found");
}

#[tokio::test]
async fn metrics_count_logins_and_failures() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "judy").await;
    Hub::exchange_code(&app, &code, &login).await;
    browser.get(format!("{}?code=x&state=forged", app.url("/callback"))).await;
    let (_, body) = call(&app, "/metrics").await;
    assert!(body.contains("tokenhub_logins_total 1"), "{body}");
    assert!(body.contains("tokenhub_login_failures_total 1"), "{body}");
    assert!(body.contains("tokenhub_hub_tokens_issued_total 1"), "{body}");
}
