//! The browser pages: token page, download, `/refresh` (refresh, or a new
//! silent login after the grant died), revocation.

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn token_page_shows_the_lineage_but_no_token_value() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let anonymous = html(Browser::new().get(app.url("/")).await).await;
    assert!(anonymous.contains("/login"), "{anonymous}");

    let browser = Browser::new();
    Hub::login(&app, &browser, "tina").await;
    let page = html(browser.get(app.url("/")).await).await;
    assert!(page.contains("Tokens of tina"));
    assert!(page.contains(&Idp::shared().issuer));
    assert!(page.contains("offline_access") || page.contains("openid"));
    let lineage = app.state().vault.load("tina", &Idp::shared().issuer).await.unwrap().unwrap();
    for secret in [
        lineage.tokens.access_token.expose_secret(),
        lineage.tokens.id_token.expose_secret(),
        lineage.tokens.refresh_token.as_ref().unwrap().expose_secret(),
    ] {
        assert!(!page.contains(secret), "a token value is in the page");
    }

    let download = browser.get(app.url("/tokens.json")).await;
    assert_eq!(download.status(), StatusCode::OK);
    assert!(download.headers()["content-disposition"].to_str().unwrap().contains(".tokens.json"));
    let document: Value = download.json().await.unwrap();
    assert_eq!(document["refresh_token"], lineage.tokens.refresh_token.as_ref().unwrap().expose_secret());
    // Without a session there is nothing to download.
    assert_error_page(Browser::new().get(app.url("/tokens.json")).await, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn refresh_url_refreshes_a_working_lineage() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    Hub::login(&app, &browser, "uma").await;
    let before = app.state().vault.load("uma", &Idp::shared().issuer).await.unwrap().unwrap();
    let refreshes = Idp::shared().refreshes("uma").await;
    let page = html(browser.get(app.url("/refresh")).await).await;
    assert!(page.contains("Your tokens were renewed"), "{page}");
    assert!(page.contains("refreshed your tokens"), "{page}");
    assert_eq!(Idp::shared().refreshes("uma").await - refreshes, 1);
    let after = app.state().vault.load("uma", &Idp::shared().issuer).await.unwrap().unwrap();
    assert_eq!(after.version, before.version + 1);
}

#[tokio::test]
async fn refresh_url_signs_in_again_after_invalid_grant() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    Hub::login(&app, &browser, "vera").await;
    assert!(Idp::shared().kill("vera").await >= 1);
    // The refresh fails with invalid_grant, so the browser goes to the IdP,
    // whose session is alive: no form, straight back to the callback.
    let response = browser.get(app.url("/refresh")).await;
    let to_idp = location(&response);
    assert!(to_idp.as_str().starts_with(&Idp::shared().issuer));
    let back = browser.sign_in_at_idp(to_idp, "vera").await;
    let page = html(browser.deliver_callback(&app, &back).await).await;
    assert!(page.contains("signed in again"), "{page}");
    let lineage = app.state().vault.load("vera", &Idp::shared().issuer).await.unwrap().unwrap();
    assert!(lineage.active);
    // The new lineage refreshes fine.
    let refreshes = Idp::shared().refreshes("vera").await;
    html(browser.get(app.url("/refresh")).await).await;
    assert_eq!(Idp::shared().refreshes("vera").await - refreshes, 1);
}

#[tokio::test]
async fn refresh_url_without_a_session_signs_in() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    let to_idp = location(&browser.get(app.url("/refresh")).await);
    let back = browser.sign_in_at_idp(to_idp, "walt").await;
    let page = html(browser.deliver_callback(&app, &back).await).await;
    assert!(page.contains("Your tokens were renewed"));
    assert!(app.state().vault.load("walt", &Idp::shared().issuer).await.unwrap().is_some());
}

#[tokio::test]
async fn revoke_needs_the_form_token_then_revokes_at_the_idp() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    Hub::login(&app, &browser, "xena").await;
    let lineage = app.state().vault.load("xena", &Idp::shared().issuer).await.unwrap().unwrap();
    let refresh_token = lineage.tokens.refresh_token.as_ref().unwrap().expose_secret().to_string();

    let origin = origin_of(&app);
    let forged = browser.http.post(app.url("/revoke")).header("origin", &origin).form(&[("csrf", "guess")]).send().await.unwrap();
    assert_error_page(forged, StatusCode::FORBIDDEN).await;
    assert!(app.state().vault.load("xena", &Idp::shared().issuer).await.unwrap().is_some());

    let page = html(browser.get(app.url("/")).await).await;
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    // The right form value from another origin, or with no Origin at all, is refused.
    for origin in [Some("http://evil.example"), Some("null"), None] {
        let mut request = browser.http.post(app.url("/revoke")).form(&[("csrf", csrf.as_str())]);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let page = assert_error_page(request.send().await.unwrap(), StatusCode::FORBIDDEN).await;
        assert!(!page.contains(&csrf));
        assert!(app.state().vault.load("xena", &Idp::shared().issuer).await.unwrap().is_some());
    }
    let done = html(
        browser.http.post(app.url("/revoke")).header("origin", &origin).form(&[("csrf", csrf.as_str())]).send().await.unwrap(),
    )
    .await;
    assert!(done.contains("revoked the refresh token"), "{done}");
    assert!(app.state().vault.load("xena", &Idp::shared().issuer).await.unwrap().is_none());
    // The IdP no longer takes the refresh token.
    let response = reqwest::Client::new()
        .post(format!("{}/token", Idp::shared().issuer))
        .basic_auth(IDP_CLIENT_ID, Some(IDP_CLIENT_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
}

/// Script on another page of the hub's origin (a user's server) fetches the
/// token page and the download with the user's cookie, or frames them: each
/// gets a 403 page without any token or CSRF value. Every response carries
/// the security headers.
#[tokio::test]
async fn token_page_and_download_only_go_to_top_level_navigation() {
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let browser = Browser::new();
    Hub::login(&app, &browser, "yara").await;
    let page = html(browser.get(app.url("/")).await).await;
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let lineage = app.state().vault.load("yara", &Idp::shared().issuer).await.unwrap().unwrap();
    let secrets = [
        lineage.tokens.access_token.expose_secret().to_string(),
        lineage.tokens.id_token.expose_secret().to_string(),
        lineage.tokens.refresh_token.as_ref().unwrap().expose_secret().to_string(),
        csrf,
    ];
    let refused: [(&str, &str, &str); 4] = [
        ("cors", "empty", "same-origin"),      // fetch() from a page on the hub's origin
        ("no-cors", "empty", "same-origin"),   // fetch(…, {mode: "no-cors"})
        ("navigate", "iframe", "same-origin"), // <iframe src=…>
        ("navigate", "object", "same-origin"), // <object>/<embed>
    ];
    // Navigations another site started: the page is shown (only the user
    // sees it: a sign-in through the IdP ends with one), the download is not.
    let from_elsewhere: [(&str, &str, &str); 2] = [
        ("navigate", "document", "cross-site"), // a link on another site, or the IdP's redirect chain
        ("navigate", "document", "same-site"),  // a sibling host name (the hub's, when tokenhub has its own)
    ];
    let fetch = |path: &str, (mode, dest, site): (&str, &str, &str)| {
        browser
            .http
            .get(app.url(path))
            .header("sec-fetch-mode", mode)
            .header("sec-fetch-dest", dest)
            .header("sec-fetch-site", site)
            .send()
    };
    for path in ["/", "/tokens.json"] {
        let cases = refused.iter().chain(if path == "/" { [].iter() } else { from_elsewhere.iter() });
        for &(mode, dest, site) in cases {
            let response = fetch(path, (mode, dest, site)).await.unwrap();
            let body = assert_error_page(response, StatusCode::FORBIDDEN).await;
            for secret in &secrets {
                assert!(!body.contains(secret.as_str()), "{path} {mode} {dest} {site} leaked a secret");
            }
        }
        // No Sec-Fetch headers at all (a script, an old browser).
        let bare = reqwest::Client::new().get(app.url(path)).send().await.unwrap();
        assert_error_page(bare, StatusCode::FORBIDDEN).await;
    }
    for case in from_elsewhere {
        assert_eq!(fetch("/", case).await.unwrap().status(), StatusCode::OK, "{case:?}");
    }
    // A link on tokenhub's own page (same-origin navigation) works.
    let download = browser.http.get(app.url("/tokens.json")).header("sec-fetch-site", "same-origin").send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);

    // Security headers on pages, downloads, JSON and errors alike.
    // The token page lets the browser send its Origin on the revoke post
    // (`same-origin`; with `no-referrer` browsers send `Origin: null`).
    for (is_page, response) in [
        (true, browser.get(app.url("/")).await),
        (false, browser.get(app.url("/tokens.json")).await),
        (false, reqwest::get(app.url("/healthz")).await.unwrap()),
        (false, reqwest::get(app.url("/api/v1/tokens")).await.unwrap()),
        (false, reqwest::get(app.url("/no/such/page")).await.unwrap()),
    ] {
        let h = response.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in ["default-src 'none'", "frame-ancestors 'none'", "form-action 'self'", "base-uri 'none'"] {
            assert!(csp.contains(directive), "{csp}");
        }
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert!(h["referrer-policy"] == "no-referrer" || (is_page && h["referrer-policy"] == "same-origin"));
        assert!(h.get("x-request-id").is_some_and(|v| !v.is_empty()));
    }
    // A request id the proxy sent is kept.
    let response = reqwest::Client::new().get(app.url("/healthz")).header("x-request-id", "proxy-id-1").send().await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "proxy-id-1");
}
