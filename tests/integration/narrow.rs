//! Narrower tokens (`GET /api/v1/tokens?scope=…&audience=…`) from the test
//! IdP (oidc-provider with resource indicators, JWT access tokens for a
//! second resource server, a token-exchange grant, refresh-token rotation):
//! by a refresh grant and by an exchange, one grant for many callers, the
//! lineage unharmed, and the operator's rules.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::Value;

use crate::refresh_safety::Caller;
use crate::support::*;

/// The IdP's second resource server.
const STORAGE: &str = "https://storage.example";

fn rules(groups: &str) -> String {
    serde_json::json!([{
        "name": "storage",
        "groups": [groups],
        "scopes": ["storage.read", "storage.modify", "storage.create"],
        "audiences": [STORAGE],
    }])
    .to_string()
}

/// tokenhub asking the IdP for the storage scopes and resource at login,
/// with `mechanism` for narrower tokens and rules for `groups`.
async fn app(hub: &HubMock, mechanism: tokenhub::config::NarrowMechanism, groups: &str) -> TestApp {
    app_with(hub, mechanism, groups, |_| {}).await
}

/// [`app`] with more settings.
async fn app_with(
    hub: &HubMock,
    mechanism: tokenhub::config::NarrowMechanism,
    groups: &str,
    more: impl FnOnce(&mut tokenhub::config::Settings) + Send + 'static,
) -> TestApp {
    app_builder(hub, mechanism, groups, more).spawn().await
}

fn app_builder(
    hub: &HubMock,
    mechanism: tokenhub::config::NarrowMechanism,
    groups: &str,
    more: impl FnOnce(&mut tokenhub::config::Settings) + Send + 'static,
) -> TestAppBuilder {
    let rules = rules(groups);
    TestApp::builder(&Idp::shared().issuer).hub(hub).settings(move |s| {
        s.oidc_scopes = Some("openid email profile offline_access storage.read storage.modify".into());
        s.oidc_auth_params = Some(format!("resource={STORAGE}"));
        s.narrow_mechanism = Some(mechanism);
        s.token_rules = Some(rules);
        more(s);
    })
}

async fn signed_in(app: &TestApp, hub: &HubMock, user: &str) -> Caller {
    signed_in_with(app, hub, user, &Browser::new()).await
}

async fn signed_in_with(app: &TestApp, hub: &HubMock, user: &str, browser: &Browser) -> Caller {
    let (code, login) = Hub::login_at(app, Idp::shared(), browser, user).await;
    assert_eq!(Hub::exchange_code(app, &code, &login).await.status(), StatusCode::OK);
    Caller::new(app, hub, user).await
}

fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT access token");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

async fn json(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// `count` requests at once for `scope` of the storage audience, taking
/// turns among `callers`; each must be answered 200. The tokens answered.
async fn all_at_once(callers: &[Arc<Caller>], count: usize, scope: &str) -> std::collections::HashSet<String> {
    let calls: Vec<_> = (0..count)
        .map(|i| {
            let (caller, query) = (callers[i % callers.len()].clone(), storage_query(scope));
            tokio::spawn(async move { json(caller.get(&query).await).await })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        tokens.insert(body["access_token"].as_str().unwrap().to_string());
    }
    tokens
}

fn storage_query(scope: &str) -> String {
    format!("?scope={scope}&audience={}", url::form_urlencoded::byte_serialize(STORAGE.as_bytes()).collect::<String>())
}

/// By a refresh grant: the token is for the second audience with the scope
/// asked for; a second call is answered from the vault; a scope the login
/// never held is refused (400 `invalid_scope`), one outside the rules gets
/// 403 naming the rule; the lineage's rotated refresh token refreshes after.
#[tokio::test]
async fn a_narrower_scope_for_the_second_audience_by_a_refresh_grant() {
    use tokenhub::config::NarrowMechanism;
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let app = app(&hub, NarrowMechanism::Refresh, "*").await;
    let caller = signed_in(&app, &hub, "narrow-refresh").await;
    let before = idp.refreshes("narrow-refresh").await;

    let (status, body) = json(caller.get(&storage_query("storage.read")).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = jwt_claims(body["access_token"].as_str().unwrap());
    assert_eq!(claims["aud"], STORAGE, "{claims}");
    assert_eq!(claims["scope"], "storage.read", "{claims}");
    assert_eq!(claims["iss"], idp.issuer.as_str());
    assert_eq!(body["audience"], STORAGE);
    assert!(body.get("refresh_token").is_none(), "a narrower token comes without a refresh token");
    assert_eq!(idp.refreshes("narrow-refresh").await, before + 1);

    let (status, again) = json(caller.get(&storage_query("storage.read")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["access_token"], body["access_token"], "answered from the vault");
    assert_eq!(idp.refreshes("narrow-refresh").await, before + 1);

    let (status, wider) = json(caller.get(&storage_query("storage.create")).await).await;
    assert_eq!((status, wider["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")), "{wider}");
    let (status, refused) = json(caller.get(&storage_query("compute.run")).await).await;
    assert_eq!((status, refused["error"].as_str()), (StatusCode::FORBIDDEN, Some("access_denied")), "{refused}");
    assert!(refused["error_description"].as_str().unwrap().contains("rule \"storage\""), "{refused}");
    let (status, other) = json(caller.get("?scope=storage.read&audience=https://elsewhere.example").await).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{other}");

    // The grant rotated the lineage's refresh token; the new one works.
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    let lineage = app.state().vault.load("narrow-refresh", &idp.issuer).await.unwrap().unwrap();
    assert!(lineage.active);
}

/// Fifty callers at once asking for the same token cause one grant at the
/// IdP; all get the same token; the lineage refreshes afterwards.
#[tokio::test]
async fn fifty_concurrent_callers_cause_one_grant() {
    use tokenhub::config::NarrowMechanism;
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let app = app(&hub, NarrowMechanism::Refresh, "*").await;
    let caller = Arc::new(signed_in(&app, &hub, "narrow-storm").await);
    let before = idp.refreshes("narrow-storm").await;
    let tokens = all_at_once(std::slice::from_ref(&caller), 50, "storage.modify storage.read").await;
    assert_eq!(tokens.len(), 1, "every caller got the one token obtained");
    assert_eq!(idp.refreshes("narrow-storm").await, before + 1, "one grant at the IdP");
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK, "no invalid_grant: {}", response.text().await.unwrap());
}

/// By an RFC 8693 exchange: the token is for the second audience, many
/// callers cause one exchange, and the lineage's refresh token is untouched.
#[tokio::test]
async fn the_second_audience_by_a_token_exchange() {
    use tokenhub::config::NarrowMechanism;
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let app = app(&hub, NarrowMechanism::Exchange, "*").await;
    let caller = Arc::new(signed_in(&app, &hub, "narrow-exchange").await);
    let refreshes = idp.refreshes("narrow-exchange").await;
    let exchanges = || async { idp.stats_of("narrow-exchange").await["token_exchange"].as_u64().unwrap_or(0) };
    let tokens = all_at_once(std::slice::from_ref(&caller), 20, "storage.read").await;
    assert_eq!(tokens.len(), 1);
    let claims = jwt_claims(tokens.iter().next().unwrap());
    assert_eq!((claims["aud"].as_str(), claims["scope"].as_str()), (Some(STORAGE), Some("storage.read")), "{claims}");
    assert_eq!(exchanges().await, 1, "one exchange for all");
    assert_eq!(idp.refreshes("narrow-exchange").await, refreshes, "the lineage's refresh token was not used");
    // A scope the login's grant does not hold for the resource: the IdP refuses, the lineage stays.
    let (status, refused) = json(caller.get(&storage_query("storage.create")).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(caller.force().await.status(), StatusCode::OK);
}

/// Rules go by hub group: a user outside the rule's group is refused (403,
/// naming the groups), a member is served; a user's held token never
/// answers another user.
#[tokio::test]
async fn rules_go_by_hub_group_and_a_token_answers_only_its_user() {
    use tokenhub::config::NarrowMechanism;
    let hub = HubMock::start().await;
    let app = app(&hub, NarrowMechanism::Refresh, "physics").await;
    hub.member_of("narrow-physicist", &["physics"]).await;
    hub.member_of("narrow-chemist", &["chemistry"]).await;
    hub.member_of("narrow-colleague", &["physics"]).await;
    let colleague = signed_in(&app, &hub, "narrow-colleague").await;
    let physicist = signed_in(&app, &hub, "narrow-physicist").await;
    let chemist = signed_in(&app, &hub, "narrow-chemist").await;

    let (status, refused) = json(chemist.get(&storage_query("storage.read")).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert!(refused["error_description"].as_str().unwrap().contains("chemistry"), "{refused}");

    let (status, mine) = json(physicist.get(&storage_query("storage.read")).await).await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(jwt_claims(mine["access_token"].as_str().unwrap())["sub"], "narrow-physicist");
    // Another member asking for the same: their own token, never the one held for the first.
    let (status, theirs) = json(colleague.get(&storage_query("storage.read")).await).await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    assert_ne!(theirs["access_token"], mine["access_token"]);
    assert_eq!(jwt_claims(theirs["access_token"].as_str().unwrap())["sub"], "narrow-colleague");
}

/// The token page lists the narrower tokens held (scope, audience, expiry;
/// never a value) and drops them by a same-origin form with its CSRF value;
/// the next request obtains a new one.
#[tokio::test]
async fn the_token_page_lists_narrower_tokens_without_values_and_drops_them() {
    use tokenhub::config::NarrowMechanism;
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let app = app(&hub, NarrowMechanism::Exchange, "*").await;
    let browser = Browser::new();
    let (code, login) = Hub::login_at(&app, idp, &browser, "narrow-page").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    let caller = Caller::new(&app, &hub, "narrow-page").await;
    let (status, body) = json(caller.get(&storage_query("storage.read")).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let value = body["access_token"].as_str().unwrap().to_string();

    let page = html(browser.get(app.url("/")).await).await;
    assert!(page.contains("storage.read") && page.contains(STORAGE), "{page}");
    assert!(!page.contains(&value), "a narrower token's value is in the page");
    let held = async || app.state().vault.narrow_held("narrow-page", &idp.issuer).await.unwrap().len();
    assert_eq!(held().await, 1);

    let origin = origin_of(&app);
    let forged = browser.http.post(app.url("/narrow/drop")).header("origin", &origin).form(&[("csrf", "guess")]);
    assert_error_page(forged.send().await.unwrap(), StatusCode::FORBIDDEN).await;
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let elsewhere = browser.http.post(app.url("/narrow/drop")).header("origin", "http://evil.example");
    assert_error_page(elsewhere.form(&[("csrf", csrf.as_str())]).send().await.unwrap(), StatusCode::FORBIDDEN).await;
    assert_eq!(held().await, 1, "refused drops drop nothing");

    let dropped = browser.http.post(app.url("/narrow/drop")).header("origin", &origin).form(&[("csrf", csrf.as_str())]);
    let dropped = dropped.send().await.unwrap();
    assert_eq!(dropped.status(), StatusCode::SEE_OTHER);
    assert_eq!(held().await, 0);
    assert!(html(browser.get(app.url("/")).await).await.contains("No narrower token is held"));
    let (status, again) = json(caller.get(&storage_query("storage.read")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(again["access_token"].as_str(), Some(value.as_str()), "obtained anew");
}

/// Delegation: a hub service whose token holds `custom:tokenhub:delegate`
/// (here for the group physics) fetches a member's narrower token within
/// its cap; beyond the cap, for a non-member, without the scope, as a user,
/// or for a service without a cap: 403. Each user's token is their own.
#[tokio::test]
async fn a_hub_service_fetches_a_users_token_by_delegation_within_its_cap() {
    use tokenhub::config::NarrowMechanism;
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let caps = serde_json::json!([
        {"service": "dask-gateway", "scopes": ["storage.read"], "audiences": [STORAGE]},
    ])
    .to_string();
    let app = app_with(&hub, NarrowMechanism::Exchange, "*", move |s| s.delegation = Some(caps)).await;
    hub.member_of("deleg-alice", &["physics"]).await;
    hub.member_of("deleg-carol", &["physics"]).await;
    hub.member_of("deleg-bob", &["chemistry"]).await;
    hub.member_of("deleg-nobody", &["physics"]).await;
    let alices_browser = Browser::new();
    let alice = signed_in_with(&app, &hub, "deleg-alice", &alices_browser).await;
    signed_in(&app, &hub, "deleg-carol").await;
    signed_in(&app, &hub, "deleg-bob").await;
    let gateway = hub.token_with("dask-gateway", "service", &["custom:tokenhub:delegate!group=physics"]).await;
    let plain = hub.token_with("dask-gateway", "service", &["read:users"]).await;
    let cron = hub.token_with("cron", "service", &["custom:tokenhub:delegate"]).await;
    let fetch = async |token: &str, user: &str, query: &str| {
        let url = format!("{}{query}", app.url(&format!("/api/v1/users/{user}/tokens")));
        json(reqwest::Client::new().get(url).header("authorization", format!("token {token}")).send().await.unwrap()).await
    };

    let (status, body) = fetch(&gateway, "deleg-alice", &storage_query("storage.read")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = jwt_claims(body["access_token"].as_str().unwrap());
    assert_eq!((claims["sub"].as_str(), claims["aud"].as_str()), (Some("deleg-alice"), Some(STORAGE)));
    assert!(body.get("refresh_token").is_none());
    // Alice's own request for the same is answered from what the service caused.
    let (_, own) = json(alice.get(&storage_query("storage.read")).await).await;
    assert_eq!(own["access_token"], body["access_token"]);
    // Another member: their own token, whatever is held for alice.
    let (status, carol) = fetch(&gateway, "deleg-carol", &storage_query("storage.read")).await;
    assert_eq!(status, StatusCode::OK, "{carol}");
    assert_eq!(jwt_claims(carol["access_token"].as_str().unwrap())["sub"], "deleg-carol");

    for (token, user, query, status, says) in [
        (&gateway, "deleg-bob", storage_query("storage.read"), StatusCode::FORBIDDEN, "does not hold custom:tokenhub:delegate"),
        (&gateway, "deleg-alice", storage_query("storage.modify"), StatusCode::FORBIDDEN, "beyond the cap"),
        (&plain, "deleg-alice", storage_query("storage.read"), StatusCode::FORBIDDEN, "does not hold"),
        (&cron, "deleg-alice", storage_query("storage.read"), StatusCode::FORBIDDEN, "no delegation"),
        (&alice.token, "deleg-alice", storage_query("storage.read"), StatusCode::FORBIDDEN, "only a hub service"),
        (&gateway, "deleg-alice", String::new(), StatusCode::BAD_REQUEST, "scope or an audience"),
        (&gateway, "deleg-nobody", storage_query("storage.read"), StatusCode::NOT_FOUND, "holds no tokens"),
        (&"not-a-token".to_string(), "deleg-alice", storage_query("storage.read"), StatusCode::UNAUTHORIZED, "does not know"),
    ] {
        let (got, body) = fetch(token, user, &query).await;
        assert_eq!(got, status, "{user} {query}: {body}");
        assert!(body["error_description"].as_str().unwrap().contains(says), "{user} {query}: {body}");
        assert!(body.get("access_token").is_none());
    }

    let seen = app.state().vault.store().delegations("deleg-alice", &idp.issuer).await.unwrap();
    assert_eq!(seen.iter().map(|d| (d.service.as_str(), d.fetches)).collect::<Vec<_>>(), [("dask-gateway", 1)]);
    assert!(app.state().vault.store().delegations("deleg-bob", &idp.issuer).await.unwrap().is_empty());
    let page = html(alices_browser.get(app.url("/")).await).await;
    assert!(page.contains("dask-gateway: 1 time(s)"), "the token page names the service: {page}");
}

/// Files kept fresh: at spawn the server is told the bearer-token file's
/// path (`BEARER_TOKEN_FILE`); tokenhub writes it (a bare token for the
/// second audience) and an EOS-style template file with the same token
/// through the server's Contents API with the server's own token, and
/// writes both again with a new token once the held one nears its expiry
/// (keep-alive's round).
#[tokio::test]
async fn token_files_are_written_and_renewed_before_they_expire() {
    use tokenhub::config::NarrowMechanism;
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let files = serde_json::json!([{
        "path": ".tokenhub/eos_{server}", "scope": "storage.read", "audience": STORAGE,
        "format": "template", "template": "oauth2:{access_token}:{issuer}/userinfo",
    }])
    .to_string();
    let proxy = url::Url::parse(&hub.server.uri()).unwrap();
    let app = app_with(&hub, NarrowMechanism::Exchange, "*", move |s| {
        s.token_files = Some(files);
        s.bearer_token_audience = Some(STORAGE.into());
        s.bearer_token_scope = Some("storage.read".into());
        // The mock hub is the proxy too: servers' Contents API behind it.
        s.hub_url = Some(proxy);
    })
    .await;
    let user = "narrow-files";
    let browser = Browser::new();
    signed_in_with(&app, &hub, user, &browser).await;
    let server_token = hub.running(&app, user).await;
    hub.takes_files(user, &server_token).await;

    // The spawn hook is told which files come, and which variable names one.
    let (_, spawn) = json(Hub::spawn_call(&app, user, "", &server_token).await).await;
    assert_eq!(
        spawn["files"],
        serde_json::json!([
            {"path": ".tokenhub/eos_default", "env": null},
            {"path": ".tokenhub/bt_default", "env": "BEARER_TOKEN_FILE"},
        ]),
        "{spawn}"
    );
    assert!(spawn["env"].get("BEARER_TOKEN").is_none());

    let bearer = async || hub.written(user, ".tokenhub/bt_default").await.into_iter().flatten().collect::<Vec<_>>();
    let eos = async || hub.written(user, ".tokenhub/eos_default").await.into_iter().flatten().collect::<Vec<_>>();
    tokenhub::tokens::keepalive::round_once(app.state()).await.unwrap();
    wait_until(Duration::from_secs(10), "the files are written", async || !bearer().await.is_empty() && !eos().await.is_empty())
        .await;
    assert!(hub.written(user, ".tokenhub").await.contains(&None), "the folder is made first");
    let first = bearer().await.last().unwrap().clone();
    assert!(first.ends_with('\n') && !first.trim().contains('\n'), "a bare token, whole");
    let token = first.trim().to_string();
    let claims = jwt_claims(&token);
    assert_eq!(
        (claims["aud"].as_str(), claims["scope"].as_str(), claims["sub"].as_str()),
        (Some(STORAGE), Some("storage.read"), Some(user))
    );
    assert_eq!(eos().await.last().unwrap(), &format!("oauth2:{token}:{}/userinfo", idp.issuer));
    // The token page says which files hold the token (never its value).
    let page = html(browser.get(app.url("/")).await).await;
    assert!(page.contains(".tokenhub/eos_{server}, .tokenhub/bt_{server}"), "{page}");
    assert!(!page.contains(&token));

    // A round with nothing near its expiry writes nothing again.
    let writes = bearer().await.len();
    tokenhub::tokens::keepalive::round_once(app.state()).await.unwrap();
    assert_eq!(bearer().await.len(), writes);

    // The held token nears its expiry: the next round writes a new one.
    app.sql(&format!(
        "UPDATE narrow_tokens SET expires_at = strftime('%s','now') + 30, obtained_at = strftime('%s','now') - 3570 WHERE username = '{user}'"
    ))
    .await;
    tokenhub::tokens::keepalive::round_once(app.state()).await.unwrap();
    wait_until(Duration::from_secs(10), "the files are renewed", async || bearer().await.last() != Some(&first)).await;
    let renewed = bearer().await.last().unwrap().trim().to_string();
    assert_ne!(renewed, token);
    assert_eq!(eos().await.last().unwrap(), &format!("oauth2:{renewed}:{}/userinfo", idp.issuer));
}

/// A rule may give its groups' bearer-token file: at spawn, a member of
/// physics is told `BEARER_TOKEN_FILE` (the rule's audience), a user whose
/// rules name none gets no such file.
#[tokio::test]
async fn a_rule_gives_its_groups_a_bearer_token_file() {
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let rules = serde_json::json!([
        {"name": "physics", "groups": ["physics"], "scopes": ["storage.read"], "audiences": [STORAGE],
         "bearer": {"audience": STORAGE, "scope": "storage.read"}},
        {"name": "everyone", "groups": ["*"], "scopes": ["storage.read"], "audiences": [STORAGE]},
    ])
    .to_string();
    let app = TestApp::builder(&idp.issuer).hub(&hub).settings(|s| s.token_rules = Some(rules)).spawn().await;
    hub.member_of("rb-physicist", &["physics"]).await;
    hub.member_of("rb-chemist", &["chemistry"]).await;
    for (user, files) in [
        ("rb-physicist", serde_json::json!([{"path": ".tokenhub/bt_gpu", "env": "BEARER_TOKEN_FILE"}])),
        ("rb-chemist", serde_json::json!([])),
    ] {
        signed_in(&app, &hub, user).await;
        let server_token = hub.token_with(user, "user", &[&format!("access:servers!server={user}/gpu")]).await;
        let (status, spawn) = json(Hub::spawn_call(&app, user, "gpu", &server_token).await).await;
        assert_eq!(status, StatusCode::OK, "{spawn}");
        assert_eq!(spawn["files"], files, "{user}");
    }
}

/// Two replicas on one PostgreSQL database, callers at both asking for
/// the same token at once: one exchange at the IdP (the lineage's lease
/// spans replicas).
#[tokio::test]
async fn two_replicas_exchange_once() {
    use tokenhub::config::NarrowMechanism;
    let (idp, hub) = (Idp::shared(), HubMock::start().await);
    let database = Postgres::shared().new_database().await;
    let replica = async || app_builder(&hub, NarrowMechanism::Exchange, "*", |_| {}).database(database.clone()).spawn().await;
    let (a, b) = (replica().await, replica().await);
    let user = "narrow-replicas";
    let at_a = Arc::new(signed_in(&a, &hub, user).await);
    let at_b = Arc::new(Caller::new(&b, &hub, user).await);
    let tokens = all_at_once(&[at_a, at_b], 20, "storage.read").await;
    assert_eq!(tokens.len(), 1, "both replicas answer the one token obtained");
    assert_eq!(idp.stats_of(user).await["token_exchange"], 1, "one exchange at the IdP");
}
