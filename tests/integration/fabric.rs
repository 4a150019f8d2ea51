//! The FABRIC broker: FABlib's Credential Manager calls answered by
//! tokenhub, in front of a stand-in CM (`idp/credmgr.mjs`, refreshing at
//! the test IdP with the client it shares with tokenhub, rotation on):
//! one CM refresh for many callers, replaced refresh tokens answered with
//! the current tokens, the CM's refusal passed on with `/refresh`, other
//! calls passed on, a revoke ending the lineage, custody, and the broker's
//! own TLS listener.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::refresh_safety::Caller;
use crate::support::*;

/// A stand-in Credential Manager process.
struct Cm {
    url: String,
    child: Child,
}

impl Drop for Cm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cm {
    fn start(idp: &Idp, ttl: u64) -> Cm {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap().keep().unwrap().1;
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("node")
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("idp/credmgr.mjs"))
            .env("CM_PORT", port.to_string())
            .env("CM_IDP", &idp.issuer)
            .env("CM_CLIENT_ID", IDP_CLIENT_ID)
            .env("CM_CLIENT_SECRET", IDP_CLIENT_SECRET)
            .env("CM_TOKEN_TTL", ttl.to_string())
            .env("CM_PARENT_PID", std::process::id().to_string())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("node runs");
        wait_for_port(port, "the stand-in Credential Manager");
        Cm { url: format!("http://127.0.0.1:{port}"), child }
    }

    async fn stats(&self) -> Value {
        reqwest::get(format!("{}/_test/stats", self.url)).await.unwrap().json().await.unwrap()
    }

    async fn answered(&self) -> u64 {
        self.stats().await["answered"].as_u64().unwrap()
    }

    async fn asked(&self) -> u64 {
        self.stats().await["asked"].as_u64().unwrap()
    }

    async fn fault(&self, kind: &str, query: &str) {
        let url = format!("{}/_test/{kind}?{query}", self.url);
        assert!(reqwest::Client::new().post(url).send().await.unwrap().status().is_success());
    }

    /// The FABRIC JWT's claims, verified with the CM's `/certs`.
    async fn verify(&self, jwt: &str) -> Value {
        let keys: jsonwebtoken::jwk::JwkSet =
            reqwest::get(format!("{}/credmgr/certs", self.url)).await.unwrap().json().await.unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&keys.keys[0]).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&["cm.fabric-testbed.net"]);
        jsonwebtoken::decode::<Value>(jwt, &key, &validation).expect("the FABRIC JWT verifies against the CM's keys").claims
    }
}

const BROKER_HOST: &str = "broker.fabric.test";

async fn app(hub: &HubMock, cm: &Cm, more: impl FnOnce(&mut tokenhub::config::Settings) + Send + 'static) -> TestApp {
    app_builder(hub, cm, more).spawn().await
}

fn app_builder(hub: &HubMock, cm: &Cm, more: impl FnOnce(&mut tokenhub::config::Settings) + Send + 'static) -> TestAppBuilder {
    let url = url::Url::parse(&cm.url).unwrap();
    let proxy = url::Url::parse(&hub.server.uri()).unwrap();
    TestApp::builder(&Idp::shared().issuer).hub(hub).settings(move |s| {
        s.hub_url = Some(proxy);
        s.fabric_credmgr_url = Some(url);
        s.fabric_broker_host = Some(BROKER_HOST.into());
        s.fabric_min_valid = Some(30);
        more(s);
    })
}

async fn signed_in(app: &TestApp, hub: &HubMock, user: &str) -> Caller {
    let (code, login) = Hub::login_at(app, Idp::shared(), &Browser::new(), user).await;
    assert_eq!(Hub::exchange_code(app, &code, &login).await.status(), StatusCode::OK);
    Caller::new(app, hub, user).await
}

async fn current(caller: &Caller) -> Value {
    let response = caller.get("").await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// FABlib's refresh call: `POST /credmgr/tokens/refresh?project_id=…&scope=all`.
async fn fablib_refresh(client: &reqwest::Client, base: &str, project: &str, refresh_token: &str) -> (StatusCode, Value) {
    let response = client
        .post(format!("{base}/credmgr/tokens/refresh?project_id={project}&scope=all"))
        .json(&json!({ "refresh_token": refresh_token }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn root(app: &TestApp) -> String {
    format!("http://{}", app.addr())
}

#[tokio::test]
async fn many_fablib_refreshes_make_one_cm_refresh_and_stale_kernels_converge() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabia").await;
    let login = current(&caller).await;
    let first_refresh = login["refresh_token"].as_str().unwrap().to_string();
    let idp_before = Idp::shared().refreshes("fabia").await;

    // Twenty kernels load FABlib at once, each with the token file's refresh token.
    let client = reqwest::Client::new();
    let base = root(&app);
    let calls = (0..20).map(|_| fablib_refresh(&client, &base, "p-1", &first_refresh));
    let answers = futures::future::join_all(calls).await;
    let mut jwts = std::collections::HashSet::new();
    let mut refreshes = std::collections::HashSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["type"], "token");
        jwts.insert(body["data"][0]["id_token"].as_str().unwrap().to_string());
        refreshes.insert(body["data"][0]["refresh_token"].as_str().unwrap().to_string());
    }
    assert_eq!((jwts.len(), refreshes.len()), (1, 1), "every caller got the same answer");
    assert_eq!(cm.answered().await, 1, "one refresh at the Credential Manager");
    assert_eq!(Idp::shared().refreshes("fabia").await - idp_before, 1, "one refresh at the IdP");
    let jwt = jwts.into_iter().next().unwrap();
    let new_refresh = refreshes.into_iter().next().unwrap();
    assert_ne!(new_refresh, first_refresh);
    let claims = cm.verify(&jwt).await;
    assert_eq!(claims["projects"][0]["uuid"], "p-1");
    assert_eq!(claims["sub"], login["subject"]);

    // tokenhub's own API serves what the CM gave: the FABRIC JWT and the new refresh token.
    let now = current(&caller).await;
    assert_eq!(now["refresh_token"], new_refresh.as_str());
    assert_eq!(now["id_token"], jwt.as_str());
    assert_eq!(now["access_token"], jwt.as_str());

    // A kernel still holding the replaced token, and one with the current
    // token while the JWT is young: answered from the vault.
    for presented in [&first_refresh, &new_refresh] {
        let (status, body) = fablib_refresh(&client, &root(&app), "p-1", presented).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"][0]["id_token"], jwt.as_str());
        assert_eq!(body["data"][0]["refresh_token"], new_refresh.as_str());
    }
    assert_eq!(cm.asked().await, 1, "no further call at the CM");
    let metrics = reqwest::get(app.url("/metrics")).await.unwrap().text().await.unwrap();
    for (outcome, n) in [("refreshed", 20), ("grace", 1), ("vault", 1), ("refused", 0)] {
        let line = format!("tokenhub_fabric_broker_refreshes_total{{outcome=\"{outcome}\"}} {n}\n");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }

    // Another project needs the CM again (one refresh), and the replaced
    // tokens still converge on it.
    let (status, body) = fablib_refresh(&client, &root(&app), "p-2", &first_refresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = body["data"][0]["id_token"].as_str().unwrap();
    assert_eq!(cm.verify(second).await["projects"][0]["uuid"], "p-2");
    assert_eq!(cm.answered().await, 2);
    assert_eq!(Idp::shared().refreshes("fabia").await - idp_before, 2);
    assert_eq!(cm.stats().await["refused"], 0, "no refresh token was refused at the IdP");

    // Nothing of a token reaches the log; the vault holds them sealed.
    let logs = logs();
    let bytes = app.database_bytes();
    for secret in [&first_refresh, &new_refresh, &jwt] {
        assert!(!logs.contains(secret.as_str()), "a token in the log");
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "a token in the database");
    }
}

#[tokio::test]
async fn two_replicas_on_postgresql_make_one_cm_refresh() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let database = Postgres::shared().new_database().await;
    let (a, b) = (
        app_builder(&hub, &cm, |_| {}).database(database.clone()).spawn().await,
        app_builder(&hub, &cm, |_| {}).database(database.clone()).spawn().await,
    );
    let caller = signed_in(&a, &hub, "fabrizia").await;
    let refresh = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    let idp_before = Idp::shared().refreshes("fabrizia").await;
    let client = reqwest::Client::new();
    let (root_a, root_b) = (root(&a), root(&b));
    let calls = (0..20).map(|i| fablib_refresh(&client, if i % 2 == 0 { &root_a } else { &root_b }, "p", &refresh));
    let answers = futures::future::join_all(calls).await;
    let tokens: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            body["data"][0]["refresh_token"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(tokens.len(), 1, "both replicas answer the one refresh");
    assert_eq!(cm.answered().await, 1, "one refresh at the CM across replicas");
    assert_eq!(Idp::shared().refreshes("fabrizia").await - idp_before, 1);
}

#[tokio::test]
async fn tokenhubs_own_refreshes_go_through_the_cm_and_files_get_its_document() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabio").await;
    hub.running(&app, "fabio").await;
    // A new server of a lineage without a FABRIC JWT: one is had at once.
    wait_until(std::time::Duration::from_secs(20), "a FABRIC JWT for the new server", async || {
        hub.token_files("fabio").await.last().is_some_and(|d| d["comment"] == "Created via API")
    })
    .await;
    assert_eq!(cm.answered().await, 1);
    let response = caller.force().await;
    assert_eq!(response.status(), StatusCode::OK);
    let forced: Value = response.json().await.unwrap();
    assert_eq!(cm.answered().await, 2, "the forced refresh went through the CM");
    let jwt = forced["id_token"].as_str().unwrap();
    cm.verify(jwt).await;
    // The server's token file gets the CM's document, as FABlib writes it.
    let mut document = Value::Null;
    wait_until(std::time::Duration::from_secs(20), "the CM's document in the token file", async || {
        document = hub.token_files("fabio").await.pop().unwrap_or(Value::Null);
        document["id_token"] == jwt
    })
    .await;
    assert_eq!(document["refresh_token"], forced["refresh_token"]);
    assert_eq!(document["comment"], "Created via API", "the CM's own fields: {document}");
    assert!(document["token_hash"].is_string());
}

#[tokio::test]
async fn the_cms_refusal_comes_back_with_the_refresh_url_and_ends_the_lineage() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabian").await;
    let refresh = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    Idp::shared().kill("fabian").await;

    let client = reqwest::Client::new();
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &refresh).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "the CM's status: {body}");
    let details = body["errors"][0]["details"].as_str().unwrap();
    assert!(details.contains("invalid or has expired"), "the CM's words: {details}");
    assert!(details.contains(&app.state().reauth_url), "names /refresh: {details}");
    assert_eq!(body["reauth_url"], app.state().reauth_url.as_str());
    let asked = cm.asked().await;
    // urllib3's retries of the same call: the same answer, the CM not asked again.
    let (again, _) = fablib_refresh(&client, &root(&app), "p", &refresh).await;
    assert_eq!(again, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(cm.asked().await, asked);
    assert_eq!(caller.get("").await.status(), StatusCode::UNAUTHORIZED, "the lineage is dead");
}

#[tokio::test]
async fn a_cm_outage_keeps_the_lineage() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabrizio").await;
    let refresh = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();

    // A 503 (the CM down behind its proxy) is tried again at once.
    cm.fault("fail", "count=1&status=503").await;
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &refresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((cm.asked().await, cm.answered().await), (2, 1));
    let refresh = body["data"][0]["refresh_token"].as_str().unwrap().to_string();

    // A 500 of the CM's own may come after its refresh at the IdP: never
    // sent again at once; the caller is told to come back, the lineage kept.
    cm.fault("fail", "count=1&status=500").await;
    let response = client
        .post(format!("{}/credmgr/tokens/refresh?project_id=other&scope=all", root(&app)))
        .json(&json!({ "refresh_token": refresh }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(cm.asked().await, 3);
    let (status, body) = fablib_refresh(&client, &root(&app), "other", &refresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(cm.answered().await, 2);
    assert_eq!(current(&caller).await["refresh_token"], body["data"][0]["refresh_token"]);
}

#[tokio::test]
async fn a_cm_that_refreshed_then_failed_loses_nothing() {
    // The CM's own failure after its refresh at the IdP: its error carries
    // the new refresh token, which tokenhub keeps (and never shows).
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabiano").await;
    let first = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    cm.fault("mintfail", "count=1").await;
    let client = reqwest::Client::new();
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &first).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let kept = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(kept, first, "the CM's new refresh token is kept");
    assert!(!body.to_string().contains(&kept));
    assert!(!logs().contains(&kept), "the token in the CM's error is not logged");
    // The kernel comes back with the token it holds: one refresh with the kept token.
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &first).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    cm.verify(body["data"][0]["id_token"].as_str().unwrap()).await;
    let stats = cm.stats().await;
    assert_eq!(
        (stats["mintfailed"].as_u64(), stats["answered"].as_u64(), stats["refused"].as_u64()),
        (Some(1), Some(1), Some(0))
    );
}

#[tokio::test]
async fn a_cm_answer_lost_after_its_refresh_is_not_sent_again_at_once() {
    // The stand-in CM refreshes at the IdP and closes the connection
    // unanswered: the refresh token may be spent, so tokenhub does not send
    // it again within the call (urllib3's retries share the failure for a
    // moment); the lineage stays until the CM itself refuses the token,
    // which then comes back with /refresh.
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabiana").await;
    let refresh = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    cm.fault("drop", "count=1").await;
    let client = reqwest::Client::new();
    let (status, _) = fablib_refresh(&client, &root(&app), "p", &refresh).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(cm.stats().await["dropped"], 1);
    assert_eq!(cm.asked().await, 1, "not sent again within the call");
    assert_eq!(caller.get("").await.status(), StatusCode::OK, "the lineage is kept");
    // The CM spent it: the next try is refused there, and says how to go on.
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &refresh).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["reauth_url"], app.state().reauth_url.as_str());
}

#[tokio::test]
async fn replaced_refresh_tokens_are_answered_within_their_bounds_only() {
    // The 16 newest replaced tokens of a lineage, for TOKENHUB_FABRIC_GRACE
    // seconds; older ones are retired: refused, and never passed to the CM
    // (a rotating IdP that sees a spent token may end the login), even
    // though tokens tokenhub never held are passed on (the default).
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabius").await;
    let client = reqwest::Client::new();
    let login = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &login).await;
    // Once, under a whole suite's load, this answer held no token: say what it held.
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut replaced = vec![login, body["data"][0]["refresh_token"].as_str().unwrap_or_else(|| panic!("{body}")).to_string()];
    // tokenhub's own refreshes (for the same project) replace it 17 times.
    for _ in 0..17 {
        let forced: Value = caller.force().await.json().await.unwrap();
        replaced.push(forced["refresh_token"].as_str().unwrap().to_string());
    }
    let newest = replaced.pop().unwrap();
    assert_eq!(replaced.len(), 18);
    let asked = cm.asked().await;
    let refused_as_retired = |status: StatusCode, body: &Value| {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["reauth_url"], app.state().reauth_url.as_str());
        assert!(body["errors"][0]["details"].as_str().unwrap().contains("replaced long ago"), "{body}");
    };
    // The two oldest replaced tokens fell out of the 16 answered.
    for old in &replaced[..2] {
        let (status, body) = fablib_refresh(&client, &root(&app), "p", old).await;
        refused_as_retired(status, &body);
    }
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &replaced[2]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"][0]["refresh_token"], newest.as_str());
    // Past the grace, a replaced token is retired too; and still after the
    // periodic purge has moved it out of the answered ones.
    app.sql("UPDATE refresh_predecessors SET rotated_at = rotated_at - 100000").await;
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &replaced[17]).await;
    refused_as_retired(status, &body);
    let now = tokenhub::time::now();
    app.state().vault.store().purge_predecessors(now - 86_400, now).await.unwrap();
    assert!(app.sql("SELECT * FROM refresh_predecessors").await.is_empty());
    for old in [&replaced[0], &replaced[17]] {
        let (status, body) = fablib_refresh(&client, &root(&app), "p", old).await;
        refused_as_retired(status, &body);
    }
    assert_eq!(cm.asked().await, asked, "no retired token reached the CM");
    // The lineage lives on: its current token is answered.
    let (status, body) = fablib_refresh(&client, &root(&app), "p", &newest).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let metrics = reqwest::get(app.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tokenhub_fabric_broker_refreshes_total{outcome=\"retired\"} 5\n"), "{metrics}");
    // Retired digests are forgotten after 30 days.
    app.sql("UPDATE retired_refresh_tokens SET retired_at = retired_at - 2592001").await;
    app.state().vault.store().purge_predecessors(now - 86_400, now).await.unwrap();
    assert!(app.sql("SELECT * FROM retired_refresh_tokens").await.is_empty());
}

#[tokio::test]
async fn unknown_refresh_tokens_are_passed_on_or_refused_by_setting() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let client = reqwest::Client::new();

    let passing = app(&hub, &cm, |_| {}).await;
    let (status, body) = fablib_refresh(&client, &root(&passing), "p", "a-token-tokenhub-never-saw").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "the CM's own answer: {body}");
    assert!(body["errors"][0]["details"].as_str().unwrap().contains("invalid or has expired"));
    assert!(body.get("reauth_url").is_none(), "the CM's answer, unchanged");
    assert_eq!(cm.asked().await, 1);

    let refusing = app(&hub, &cm, |s| s.fabric_unknown_tokens = Some(tokenhub::config::UnknownTokens::Refuse)).await;
    let (status, body) = fablib_refresh(&client, &root(&refusing), "p", "a-token-tokenhub-never-saw").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(cm.asked().await, 1, "not passed on");

    // Malformed calls get the CM's error shape.
    let response = client.post(format!("{}/credmgr/tokens/refresh", root(&refusing))).body("{").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["type"], "error");
}

#[tokio::test]
async fn other_calls_pass_on_and_a_revoke_ends_the_lineage() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabiola").await;
    let client = reqwest::Client::new();
    let version: Value = client.get(format!("{}/credmgr/version", root(&app))).send().await.unwrap().json().await.unwrap();
    assert_eq!(version["data"][0]["reference"], "stand-in");

    let refresh = current(&caller).await["refresh_token"].as_str().unwrap().to_string();
    let (_, body) = fablib_refresh(&client, &root(&app), "p", &refresh).await;
    let jwt = body["data"][0]["id_token"].as_str().unwrap().to_string();
    let new_refresh = body["data"][0]["refresh_token"].as_str().unwrap().to_string();
    let validated = client
        .post(format!("{}/credmgr/tokens/validate", root(&app)))
        .json(&json!({ "type": "identity", "token": jwt }))
        .send()
        .await
        .unwrap();
    assert_eq!(validated.status(), StatusCode::OK);

    let revoked = client
        .post(format!("{}/credmgr/tokens/revokes", root(&app)))
        .bearer_auth(&jwt)
        .json(&json!({ "type": "refresh", "token": new_refresh }))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_eq!(caller.get("").await.status(), StatusCode::UNAUTHORIZED, "the revoke ended the lineage");
}

#[tokio::test]
async fn custody_leaves_no_refresh_token_in_servers() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |s| s.fabric_custody = Some(true)).await;
    let caller = signed_in(&app, &hub, "fabienne").await;
    let token = hub.token_with("fabienne", "user", &["access:servers!server=fabienne/"]).await;
    let spawned: Value = Hub::spawn_call(&app, "fabienne", "", &token).await.json().await.unwrap();
    assert!(spawned["env"].get("CILOGON_REFRESH_TOKEN").is_none(), "{spawned}");
    assert_eq!(spawned["env"]["FABRIC_CREDMGR_HOST"], BROKER_HOST);
    // The spawn gets a FABRIC JWT at once (FABlib cannot ask for one here).
    wait_until(std::time::Duration::from_secs(20), "a FABRIC JWT after the spawn", async || cm.answered().await == 1).await;
    let answer = current(&caller).await;
    assert!(answer["refresh_token"].is_null(), "the notebook API holds it back too");
    cm.verify(answer["id_token"].as_str().unwrap()).await;
    // tokenhub keeps the JWT fresh by itself, through the CM.
    assert_eq!(caller.force().await.status(), StatusCode::OK);
    assert_eq!(cm.answered().await, 2);
    let document: Value = caller.get("?format=fabric").await.json().await.unwrap();
    assert!(document.get("refresh_token").is_none(), "{document:?}");
    cm.verify(document["id_token"].as_str().unwrap()).await;
}

#[tokio::test]
async fn the_brokers_own_tls_listener_answers_fablib() {
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let app = app(&hub, &cm, |_| {}).await;
    let caller = signed_in(&app, &hub, "fabrice").await;
    let refresh = current(&caller).await["refresh_token"].as_str().unwrap().to_string();

    // A test CA and the broker's certificate for its host name.
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![BROKER_HOST.to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    let acceptor = tokenhub::tls::acceptor(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = app.state().clone();
    let http = state.config.http.clone();
    let router = tokenhub::fabric::broker::app(state);
    tokio::spawn(async move {
        tokenhub::server::serve_with(listener, Some(acceptor), router, &http, std::future::pending()).await.unwrap()
    });

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve(BROKER_HOST, addr)
        .build()
        .unwrap();
    let base = format!("https://{BROKER_HOST}:{}", addr.port());
    let (status, body) = fablib_refresh(&client, &base, "p", &refresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    cm.verify(body["data"][0]["id_token"].as_str().unwrap()).await;
    // Only the broker is there: tokenhub's other paths are not.
    let other = client.get(format!("{base}/api/v1/tokens")).send().await.unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    // A client that does not trust the test CA does not get through.
    let untrusting = reqwest::Client::builder().resolve(BROKER_HOST, addr).build().unwrap();
    assert!(untrusting.get(format!("{base}/credmgr/version")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_refresh_token_is_found_at_every_moment_of_its_replacement() {
    // A kernel presenting the token being replaced must find it, as the
    // current one or as replaced, at every instant: one found as neither
    // would be passed to the CM, and a rotating IdP that sees a spent token
    // ends the whole grant. On both backends, the lineage is rotated 150
    // times while lookups of the token being replaced run beside.
    let hub = HubMock::start().await;
    let cm = Cm::start(Idp::shared(), 3600);
    let postgres = Postgres::shared().new_database().await;
    for (backend, database) in [("SQLite", None), ("PostgreSQL", Some(postgres))] {
        let mut builder = app_builder(&hub, &cm, |_| {});
        if let Some(url) = database {
            builder = builder.database(url);
        }
        let app = builder.spawn().await;
        let _caller = signed_in(&app, &hub, "fabienne").await;
        let state = app.state().clone();
        let issuer = state.upstream.issuer().to_string();
        let mut misses = 0;
        for round in 0..150 {
            let lineage = state.vault.load("fabienne", &issuer).await.unwrap().unwrap();
            let replaced = lineage.tokens.refresh_token.as_ref().map(secrecy::ExposeSecret::expose_secret).unwrap();
            let hash = tokenhub::vault::crypto::digest_hex(replaced);
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let lookups = tokio::spawn({
                let (state, done) = (state.clone(), done.clone());
                async move {
                    let mut missed = 0;
                    loop {
                        let finished = done.load(std::sync::atomic::Ordering::Acquire);
                        missed += u32::from(state.vault.store().refresh_owner(&hash, 0).await.unwrap().is_none());
                        if finished {
                            return missed;
                        }
                    }
                }
            });
            let tokens =
                tokenhub::vault::TokenSet { refresh_token: Some(format!("rotated-{round}").into()), ..lineage.tokens.clone() };
            assert!(state.vault.save_refresh(&lineage, &tokens, None).await.unwrap().is_some());
            done.store(true, std::sync::atomic::Ordering::Release);
            misses += lookups.await.unwrap();
        }
        assert_eq!(misses, 0, "{backend}: lookups that found the token neither current nor replaced");
    }
}
