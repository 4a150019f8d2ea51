//! A hub name belongs to one IdP subject, and names are canonical: a second
//! subject whose (user-chosen) `preferred_username` names an existing user
//! is refused at the hub's login and at `/login` before anything is stored;
//! an operator moves a name deliberately; `Alice` and `\u212aate` (Kelvin
//! sign) meet the names `alice` and `kate` and get nothing of theirs.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// A hub login through the IdP as `account` (`account~Name` chooses
/// `preferred_username` Name): the callback's answer.
async fn hub_login(app: &TestApp, account: &str) -> reqwest::Response {
    let browser = Browser::new();
    let (url, _) = Hub::authorize_url(app);
    let to_idp = location(&browser.get(url).await);
    let back = browser.sign_in_at_idp(to_idp, account).await;
    browser.deliver_callback(app, &back).await
}

/// `/login` (tokenhub's own page) as `account`: the callback's answer.
async fn page_login(app: &TestApp, account: &str) -> reqwest::Response {
    let browser = Browser::new();
    let to_idp = location(&browser.get(app.url("/login")).await);
    let back = browser.sign_in_at_idp(to_idp, account).await;
    browser.deliver_callback(app, &back).await
}

async fn subject_of(app: &TestApp, user: &str) -> Option<(String, i64)> {
    let lineage = app.state().vault.load(user, &Idp::shared().issuer).await.unwrap()?;
    Some((lineage.subject, lineage.version))
}

#[tokio::test]
async fn another_subject_cannot_take_a_name_until_an_operator_moves_it() {
    let hub = HubMock::start().await;
    let app = TestApp::builder(&Idp::shared().issuer).hub(&hub).spawn().await;
    assert_eq!(hub_login(&app, "nadia").await.status(), StatusCode::SEE_OTHER);
    let before = subject_of(&app, "nadia").await.unwrap();
    assert_eq!(before.0, "nadia");

    // Another person whose IdP lets them call themselves "nadia".
    for response in [hub_login(&app, "mallory~nadia").await, page_login(&app, "mallory~Nadia").await] {
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let page = response.text().await.unwrap();
        assert!(page.contains("belongs to someone else"), "{page}");
        assert!(page.contains("mallory~nadia") || page.contains("mallory~Nadia"), "the page shows the person their subject");
    }
    assert_eq!(subject_of(&app, "nadia").await.unwrap(), before, "nadia's lineage untouched");
    assert!(
        logs().contains(r#"subject \"mallory~nadia\" refused: the name belongs to subject \"nadia\""#),
        "audit names both subjects"
    );

    // An operator moves the name; then the new subject signs in.
    let operator = hub.token_with("ops-nina", "user", &["access:services!service=tokenhub", "custom:tokenhub:admin"]).await;
    let move_to = |subject: &str| {
        reqwest::Client::new()
            .post(app.url("/api/v1/admin/names/nadia"))
            .header("authorization", format!("token {operator}"))
            .json(&json!({ "subject": subject }))
            .send()
    };
    let nobody = hub.token_with("nobody", "user", &["access:services!service=tokenhub"]).await;
    let refused = reqwest::Client::new()
        .post(app.url("/api/v1/admin/names/nadia"))
        .header("authorization", format!("token {nobody}"))
        .json(&json!({ "subject": "mallory~nadia" }))
        .send()
        .await
        .unwrap();
    assert_json_error(refused, StatusCode::FORBIDDEN, "insufficient_scope").await;
    let moved = move_to("mallory~nadia").await.unwrap();
    assert_eq!(moved.status(), StatusCode::OK);
    let body: Value = moved.json().await.unwrap();
    assert_eq!(body["previous_subject"], "nadia");
    assert!(subject_of(&app, "nadia").await.is_none(), "the old subject's lineage is dropped");
    assert_eq!(hub_login(&app, "mallory~nadia").await.status(), StatusCode::SEE_OTHER);
    assert_eq!(subject_of(&app, "nadia").await.unwrap().0, "mallory~nadia");
    assert_eq!(hub_login(&app, "nadia").await.status(), StatusCode::FORBIDDEN, "now the old subject is refused");
    assert!(logs().contains("name moved from subject"));

    // Bad moves: a name that is not canonical, no subject.
    let bad = reqwest::Client::new()
        .post(app.url("/api/v1/admin/names/Nadia"))
        .header("authorization", format!("token {operator}"))
        .json(&json!({ "subject": "x" }))
        .send()
        .await
        .unwrap();
    assert_json_error(bad, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_json_error(move_to("").await.unwrap(), StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test]
async fn look_alike_and_mixed_case_names_are_canonical() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    for user in ["alina", "kato"] {
        assert_eq!(hub_login(&app, user).await.status(), StatusCode::SEE_OTHER);
    }
    // `Alina` (another account) and `\u{212a}ato` (Kelvin sign) are alina
    // and kato to the hub: refused, and nothing of theirs changes.
    let before = (subject_of(&app, "alina").await, subject_of(&app, "kato").await);
    assert_eq!(hub_login(&app, "other1~Alina").await.status(), StatusCode::FORBIDDEN);
    assert_eq!(hub_login(&app, "other2~%E2%84%AAato").await.status(), StatusCode::FORBIDDEN);
    assert_eq!((subject_of(&app, "alina").await, subject_of(&app, "kato").await), before);

    // One person whose IdP name is mixed case signs in, twice, as one name.
    for _ in 0..2 {
        assert_eq!(hub_login(&app, "carla~Carla").await.status(), StatusCode::SEE_OTHER);
    }
    assert_eq!(subject_of(&app, "carla").await.unwrap(), ("carla~Carla".to_string(), 2));
    assert!(subject_of(&app, "Carla").await.is_none(), "no lineage under the raw claim");

    // A name the hub would refuse is refused with a page saying why.
    let response = hub_login(&app, "slash~a%2Fb").await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(response.text().await.unwrap().contains("“/”"));
}

#[tokio::test]
async fn an_admin_moves_a_name_from_the_operators_page() {
    use wiremock::matchers::{method, path};
    let hub = HubMock::start().await;
    let app = TestApp::builder(&Idp::shared().issuer).hub(&hub).spawn().await;
    wiremock::Mock::given(method("GET"))
        .and(path("/hub/api/users/adm-ulla"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_body_json(json!({"name": "adm-ulla", "admin": true, "servers": {}})),
        )
        .mount(&hub.server)
        .await;
    assert_eq!(hub_login(&app, "ursula").await.status(), StatusCode::SEE_OTHER);
    let admin = Browser::new();
    Hub::login(&app, &admin, "adm-ulla").await;
    let page = html(admin.get(app.url("/admin")).await).await;
    assert!(page.contains("id=\"move-name\""), "{page}");
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let post = |origin: &str, csrf: &str, user: &str| {
        admin
            .http
            .post(app.url("/admin/names"))
            .header("origin", origin)
            .form(&[("csrf", csrf), ("user", user), ("subject", "newacct~ursula")])
            .send()
    };
    let origin = origin_of(&app);
    // Forged: another origin, a wrong CSRF value; a name that is not canonical.
    assert_error_page(post("http://evil.example", &csrf, "ursula").await.unwrap(), StatusCode::FORBIDDEN).await;
    assert_error_page(post(&origin, "guess", "ursula").await.unwrap(), StatusCode::FORBIDDEN).await;
    assert_error_page(post(&origin, &csrf, "Ursula").await.unwrap(), StatusCode::BAD_REQUEST).await;
    assert_eq!(subject_of(&app, "ursula").await.unwrap().0, "ursula", "nothing moved yet");
    let moved = post(&origin, &csrf, "ursula").await.unwrap();
    assert_eq!(moved.status(), StatusCode::OK);
    assert!(moved.text().await.unwrap().contains("now belongs to the subject newacct~ursula"));
    assert!(subject_of(&app, "ursula").await.is_none());
    assert_eq!(hub_login(&app, "newacct~ursula").await.status(), StatusCode::SEE_OTHER);
    assert!(logs().contains("by adm-ulla"), "audited with the admin's name");
}
