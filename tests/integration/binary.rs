//! The `tokenhub` binary itself: help, keygen, configuration errors, and a
//! login through `tokenhub serve` with its JSON logs checked for secrets.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_tokenhub");

#[test]
fn help_documents_every_setting() {
    let out = Command::new(BIN).args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let source = include_str!("../../src/config.rs");
    let vars: Vec<&str> = source.split("env = \"").skip(1).map(|rest| rest.split('"').next().unwrap()).collect();
    assert!(vars.len() >= 18, "{vars:?}");
    for var in vars {
        assert!(help.contains(var), "{var} is not in `tokenhub serve --help`");
    }
    let top = Command::new(BIN).arg("--help").output().unwrap();
    let top = String::from_utf8(top.stdout).unwrap();
    assert!(top.contains("serve") && top.contains("keygen"));
}

#[test]
fn keygen_prints_a_usable_key() {
    let out = Command::new(BIN).arg("keygen").output().unwrap();
    let key = String::from_utf8(out.stdout).unwrap();
    tokenhub::vault::crypto::KeyRing::parse(key.trim()).unwrap();
}

#[test]
fn missing_settings_are_named_and_exit_2() {
    let out = Command::new(BIN).arg("serve").env_clear().env("TOKENHUB_CRYPT_KEY", CRYPT_KEY).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("TOKENHUB_OIDC_ISSUER is required"), "{err}");
    let bad_key = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .envs([
            ("TOKENHUB_OIDC_ISSUER", "http://127.0.0.1:1"),
            ("TOKENHUB_OIDC_CLIENT_ID", "a"),
            ("TOKENHUB_OIDC_CLIENT_SECRET", "b"),
            ("TOKENHUB_HUB_CLIENT_ID", "c"),
            ("TOKENHUB_HUB_CLIENT_SECRET", "d"),
            ("TOKENHUB_HUB_REDIRECT_URI", "http://127.0.0.1:2/hub/oauth_callback"),
            ("JUPYTERHUB_CRYPT_KEY", "not-a-key"),
            ("TOKENHUB_DATABASE_URL", "sqlite::memory:"),
        ])
        .output()
        .unwrap();
    assert!(!bad_key.status.success());
    let err = String::from_utf8(bad_key.stderr).unwrap();
    assert!(err.contains("encryption key #1"), "{err}");
    assert!(!err.contains("not-a-key"), "the key value is not echoed");
}

/// What `tokenhub serve` logged (format `format`) while a user logged in,
/// until SIGTERM stopped it; and the secrets of that login.
struct ServedLogin {
    logs: String,
    secrets: Vec<String>,
    app: TestApp,
    _dir: tempfile::TempDir,
}

async fn serve_and_log_in(format: &str) -> ServedLogin {
    let idp = Idp::shared();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log_path = dir.path().join("tokenhub.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .envs(serve_env(&idp.issuer, port, &format!("sqlite://{}?mode=rwc", dir.path().join("th.sqlite").display())))
        .envs([("TOKENHUB_LOG", "debug,hyper=info,h2=info,rustls=info"), ("TOKENHUB_LOG_FORMAT", format)])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    wait_for_port(port, "tokenhub serve");
    let app = TestApp::external(format!("http://127.0.0.1:{port}"), dir.path().join("th.sqlite"));
    let health: Value = reqwest::get(app.url("/healthz")).await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");

    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "pat").await;
    let response = Hub::exchange_code(&app, &code, &login).await;
    assert_eq!(response.status(), StatusCode::OK);
    let tokens: Value = response.json().await.unwrap();
    assert_eq!(Hub::userinfo(&app, tokens["access_token"].as_str().unwrap()).await.status(), StatusCode::OK);

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tokenhub did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    let secrets = [
        code.as_str(),
        tokens["access_token"].as_str().unwrap(),
        tokens["refresh_token"].as_str().unwrap(),
        HUB_CLIENT_SECRET,
        IDP_CLIENT_SECRET,
        CRYPT_KEY,
    ];
    let secrets = secrets.map(String::from).to_vec();
    ServedLogin { logs: std::fs::read_to_string(&log_path).unwrap(), secrets, app, _dir: dir }
}

#[tokio::test]
async fn serve_logs_no_secrets_and_stops_on_sigterm() {
    let ServedLogin { logs, secrets, app, _dir } = serve_and_log_in("json").await;
    let lines: Vec<Value> = logs.lines().map(|l| serde_json::from_str(l).expect("every log line is JSON")).collect();
    let stored = lines.iter().find(|l| l["fields"]["message"] == "login stored").expect(&logs);
    // Written while the callback was served: the request's span, made
    // when the line was, with its method, path and id.
    assert_eq!(stored["span"]["name"], "http", "{stored}");
    assert_eq!(stored["span"]["method"], "GET", "{stored}");
    assert!(stored["span"]["path"].as_str().is_some_and(|p| p.ends_with("/callback")), "{stored}");
    assert!(stored["span"]["request_id"].as_str().is_some_and(|id| id.len() == 22), "{stored}");
    assert_eq!(stored["spans"].as_array().map(Vec::len), Some(1), "{stored}");
    // Outside any request: no span.
    let stopped = lines.iter().find(|l| l["fields"]["message"] == "tokenhub stopped").expect(&logs);
    assert!(stopped.get("span").is_none(), "{stopped}");
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret is in tokenhub's log");
    }
    let database = app.database_bytes();
    for secret in &secrets[..3] {
        assert!(!database.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
}

/// The text log: a line written during a request carries the request's
/// span as tracing writes a span, `http{method=… path=… request_id="…"}:`.
#[tokio::test]
async fn text_log_lines_of_a_request_carry_its_span() {
    let ServedLogin { logs, secrets, .. } = serve_and_log_in("text").await;
    let stored = logs.lines().find(|l| l.ends_with("login stored") || l.contains(": login stored")).expect(&logs);
    let (_, after_level) = stored.split_once("  INFO ").expect(stored);
    let span = after_level.strip_prefix("http{method=GET path=").expect(stored);
    let (path, rest) = span.split_once(' ').expect(stored);
    assert!(path.ends_with("/callback"), "{stored}");
    let id = rest.strip_prefix("request_id=\"").and_then(|r| r.split_once("\"}: tokenhub::oauth::login: login stored"));
    assert!(id.is_some_and(|(id, _)| id.len() == 22), "{stored}");
    let stopped = logs.lines().find(|l| l.contains("tokenhub stopped")).expect(&logs);
    assert!(!stopped.contains("http{"), "{stopped}");
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret is in tokenhub's log");
    }
}
