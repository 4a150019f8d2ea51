//! `/metrics` after real refreshes: the shared oidc-provider, a mocked hub
//! (identities, a running server, its Contents API), forced refreshes
//! through the notebook API.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::refresh_safety::Caller;
use crate::support::*;

/// tokenhub with the mock hub as API and as proxy (token files go to it).
async fn app(hub: &HubMock) -> TestApp {
    let proxy = url::Url::parse(&hub.server.uri()).unwrap();
    TestApp::builder(&Idp::shared().issuer).hub(hub).settings(|s| s.hub_url = Some(proxy)).spawn().await
}

async fn login(app: &TestApp, user: &str) {
    let (code, login) = Hub::login(app, &Browser::new(), user).await;
    assert_eq!(Hub::exchange_code(app, &code, &login).await.status(), StatusCode::OK);
}

/// One scrape, checked for the OpenMetrics content type and end marker.
async fn scrape(app: &TestApp) -> String {
    let response = reqwest::get(app.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text; version=1.0.0"), "{content_type}");
    let body = response.text().await.unwrap();
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// The value of one sample, named with its labels as exposed
/// (`tokenhub_lineages{state="active"}`); panics if it is missing.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn refreshes_waits_hub_calls_and_token_files_show_in_metrics() {
    let hub = HubMock::start().await;
    let app = app(&hub).await;
    let user = "metra";
    login(&app, user).await;
    hub.running(&app, user).await;
    let caller = Caller::new(&app, &hub, user).await;
    assert_eq!(caller.get("").await.status(), StatusCode::OK);

    let before = scrape(&app).await;
    assert_eq!(sample(&before, "tokenhub_upstream_refresh_duration_seconds_count"), 0.0);
    assert_eq!(sample(&before, r#"tokenhub_upstream_refreshes_total{outcome="ok"}"#), 0.0);
    assert_eq!(sample(&before, "tokenhub_refresh_waits_total"), 0.0);

    // Six notebook calls force a refresh at once: the first refreshes, the
    // ones queued behind it share its result.
    let idp_before = Idp::shared().refreshes(user).await;
    let answers = futures::future::join_all((0..6).map(|_| caller.force())).await;
    assert!(answers.iter().all(|a| a.status() == StatusCode::OK));
    let refreshes = Idp::shared().refreshes(user).await - idp_before;
    assert!((1..6).contains(&refreshes), "{refreshes} refreshes for six callers");

    // The token file goes to the running server in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = scrape(&app).await;
        if sample(&body, r#"tokenhub_token_file_writes_total{outcome="ok"}"#) >= 1.0 {
            break body;
        }
        assert!(Instant::now() < deadline, "no token file write counted:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refreshes = refreshes as f64;
    assert_eq!(sample(&body, "tokenhub_upstream_refresh_duration_seconds_count"), refreshes);
    assert!(sample(&body, "tokenhub_upstream_refresh_duration_seconds_sum") > 0.0);
    assert_eq!(sample(&body, r#"tokenhub_upstream_refresh_duration_seconds_bucket{le="+Inf"}"#), refreshes);
    assert_eq!(sample(&body, r#"tokenhub_upstream_refreshes_total{outcome="ok"}"#), refreshes);
    assert_eq!(sample(&body, r#"tokenhub_upstream_refreshes_total{outcome="invalid_grant"}"#), 0.0);
    assert_eq!(sample(&body, r#"tokenhub_upstream_refreshes_total{outcome="unavailable"}"#), 0.0);
    assert_eq!(sample(&body, "tokenhub_refresh_waits_total"), 6.0 - refreshes, "every caller refreshed or waited");
    assert_eq!(sample(&body, r#"tokenhub_lineages{state="active"}"#), 1.0);
    assert_eq!(sample(&body, r#"tokenhub_lineages{state="dead"}"#), 0.0);
    assert_eq!(sample(&body, r#"tokenhub_token_file_writes_total{outcome="failed"}"#), 0.0);
    assert_eq!(sample(&body, r#"tokenhub_hub_call_duration_seconds_count{call="identify"}"#), 1.0, "identities are cached");
    assert!(sample(&body, r#"tokenhub_hub_call_duration_seconds_count{call="servers"}"#) >= 1.0);
    assert!(sample(&body, r#"tokenhub_hub_call_duration_seconds_count{call="write_token_file"}"#) >= 1.0);
    assert_eq!(sample(&body, r#"tokenhub_hub_call_duration_seconds_count{call="is_admin"}"#), 0.0, "no admin asked");
    assert_eq!(sample(&body, "tokenhub_logins_total"), 1.0);
    assert_eq!(sample(&body, "tokenhub_keepalive_refreshes_total"), 0.0);
}

#[tokio::test]
async fn a_grant_killed_at_the_idp_counts_as_invalid_grant_and_a_dead_lineage() {
    let hub = HubMock::start().await;
    let app = app(&hub).await;
    let user = "mortimer";
    login(&app, user).await;
    login(&app, "metra-alive").await;
    let caller = Caller::new(&app, &hub, user).await;
    assert!(Idp::shared().kill(user).await >= 1);
    assert_json_error(caller.force().await, StatusCode::UNAUTHORIZED, "invalid_grant").await;

    let body = scrape(&app).await;
    assert_eq!(sample(&body, r#"tokenhub_upstream_refreshes_total{outcome="invalid_grant"}"#), 1.0);
    assert_eq!(sample(&body, r#"tokenhub_upstream_refreshes_total{outcome="ok"}"#), 0.0);
    assert_eq!(sample(&body, "tokenhub_upstream_refresh_duration_seconds_count"), 1.0);
    assert_eq!(sample(&body, r#"tokenhub_lineages{state="dead"}"#), 1.0);
    assert_eq!(sample(&body, r#"tokenhub_lineages{state="active"}"#), 1.0);
}
