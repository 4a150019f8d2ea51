//! Test harness: `TestApp` (tokenhub in-process on a loopback port), the
//! shared `oidc-provider` process, a `Browser` that follows the login flow
//! like a browser would, and `Hub`, a client playing JupyterHub.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::LOCATION;
use serde_json::Value;
use tokenhub::config::Settings;
use tokenhub::vault::crypto::pkce_s256;
use tokenhub::{App, AppState};
use url::Url;

pub const HUB_CLIENT_ID: &str = "jupyterhub";
pub const HUB_CLIENT_SECRET: &str = "hub-client-secret";
pub const HUB_REDIRECT_URI: &str = "http://127.0.0.1:8081/hub/oauth_callback";
/// The callback registered at the IdP. Browsers in these tests stop at the
/// IdP's redirect and deliver its query to the `TestApp` they talk to.
pub const UPSTREAM_REDIRECT_URI: &str = "http://127.0.0.1:9/callback";
pub const IDP_CLIENT_ID: &str = "tokenhub";
pub const IDP_CLIENT_SECRET: &str = "tokenhub-idp-secret";
pub const CRYPT_KEY: &str = "4f1c2b3a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";

// ---------------------------------------------------------------- logs

/// Everything every in-process tokenhub of this test binary logged.
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter(buffer.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,hyper=info,h2=info,rustls=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    });
}

/// Waits until `check` holds, at most `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The captured logs so far.
pub fn logs() -> String {
    init_logs();
    String::from_utf8_lossy(&LOGS.get().unwrap().lock().unwrap()).into_owned()
}

// ---------------------------------------------------------------- tokenhub

/// tokenhub serving on 127.0.0.1 with its own SQLite file.
pub struct TestApp {
    /// The in-process state (`None` for a tokenhub running as a process).
    state: Option<AppState>,
    pub base: String,
    pub db_path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// Builds a [`TestApp`]; defaults point at the shared oidc-provider.
pub struct TestAppBuilder {
    settings: Settings,
    base_path: String,
    database_url: Option<String>,
}

impl TestApp {
    pub fn builder(issuer: &str) -> TestAppBuilder {
        TestAppBuilder {
            settings: Settings {
                oidc_issuer: Some(issuer.into()),
                oidc_client_id: Some(IDP_CLIENT_ID.into()),
                oidc_client_secret: Some(IDP_CLIENT_SECRET.into()),
                oidc_redirect_uri: Some(Url::parse(UPSTREAM_REDIRECT_URI).unwrap()),
                oidc_scopes: Some("openid email profile groups offline_access".into()),
                hub_client_id: Some(HUB_CLIENT_ID.into()),
                hub_client_secret: Some(HUB_CLIENT_SECRET.into()),
                hub_redirect_uri: Some(Url::parse(HUB_REDIRECT_URI).unwrap()),
                crypt_key: Some(CRYPT_KEY.into()),
                ..Default::default()
            },
            base_path: String::new(),
            database_url: None,
        }
    }

    /// A tokenhub running elsewhere (a `tokenhub serve` process).
    pub fn external(base: String, db_path: PathBuf) -> TestApp {
        TestApp { state: None, base, db_path, _dir: None }
    }

    /// The in-process state.
    pub fn state(&self) -> &AppState {
        self.state.as_ref().expect("an in-process TestApp")
    }

    /// The address tokenhub listens on.
    pub fn addr(&self) -> SocketAddr {
        let url = Url::parse(&self.base).unwrap();
        SocketAddr::new(url.host_str().unwrap().parse().unwrap(), url.port().unwrap())
    }

    /// A URL of this tokenhub.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Runs SQL against the app's database file, for checks and for aging rows.
    pub async fn sql(&self, sql: &str) -> Vec<sqlx::sqlite::SqliteRow> {
        use sqlx::Connection;
        let url = format!("sqlite://{}", self.db_path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(sql).fetch_all(&mut conn).await.unwrap()
    }

    /// Number of lineages in the vault.
    pub async fn lineage_count(&self) -> i64 {
        use sqlx::Row;
        self.sql("SELECT COUNT(*) AS n FROM lineages").await[0].get("n")
    }

    /// The database file and its write-ahead log, as bytes.
    pub fn database_bytes(&self) -> Vec<u8> {
        let mut bytes = std::fs::read(&self.db_path).unwrap();
        let wal = self.db_path.with_extension("sqlite-wal");
        if let Ok(more) = std::fs::read(wal) {
            bytes.extend(more);
        }
        bytes
    }
}

impl TestAppBuilder {
    pub fn settings(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut self.settings);
        self
    }

    pub fn base_path(mut self, path: &str) -> Self {
        self.base_path = path.into();
        self
    }

    /// Points tokenhub at a (mock) hub API.
    pub fn hub(self, hub: &HubMock) -> Self {
        let api = format!("{}/hub/api", hub.server.uri());
        self.settings(|s| {
            s.hub_api_url = Some(Url::parse(&api).unwrap());
            s.hub_api_token = Some("tokenhub-service-token".into());
        })
    }

    /// Uses this database instead of a new SQLite file.
    pub fn database(mut self, url: String) -> Self {
        self.database_url = Some(url);
        self
    }

    pub async fn spawn(mut self) -> TestApp {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("tokenhub.sqlite");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("http://{addr}{}", self.base_path);
        // A public URL of the test's own (say https, as behind a TLS proxy)
        // stays; requests still go to the plain listener at `base`.
        if self.settings.public_url.is_none() {
            self.settings.public_url = Some(Url::parse(&base).unwrap());
        }
        self.settings.database_url =
            Some(self.database_url.unwrap_or_else(|| format!("sqlite://{}?mode=rwc", db_path.display())));
        let config = self.settings.into_config(None).unwrap();
        let state = App::new(config).await.unwrap();
        // The server loop `tokenhub serve` runs, with its limits.
        let router = tokenhub::app(state.clone());
        let http = state.config.http.clone();
        tokio::spawn(async move { tokenhub::server::serve(listener, router, &http, std::future::pending()).await.unwrap() });
        TestApp { state: Some(state), base, db_path, _dir: Some(dir) }
    }
}

/// The environment `tokenhub serve` (the binary) needs to run against
/// `issuer` on `port` with `database` (the test clients' settings).
pub fn serve_env(issuer: &str, port: u16, database: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TOKENHUB_BIND", format!("127.0.0.1:{port}")),
        ("TOKENHUB_OIDC_ISSUER", issuer.to_string()),
        ("TOKENHUB_OIDC_CLIENT_ID", IDP_CLIENT_ID.into()),
        ("TOKENHUB_OIDC_CLIENT_SECRET", IDP_CLIENT_SECRET.into()),
        ("TOKENHUB_OIDC_REDIRECT_URI", UPSTREAM_REDIRECT_URI.into()),
        ("TOKENHUB_HUB_CLIENT_ID", HUB_CLIENT_ID.into()),
        ("TOKENHUB_HUB_CLIENT_SECRET", HUB_CLIENT_SECRET.into()),
        ("TOKENHUB_HUB_REDIRECT_URI", HUB_REDIRECT_URI.into()),
        ("JUPYTERHUB_CRYPT_KEY", CRYPT_KEY.into()),
        ("TOKENHUB_DATABASE_URL", database.to_string()),
    ]
}

// ---------------------------------------------------------------- the IdP

/// An oidc-provider process: the shared one of this test binary, or one a
/// test starts for itself (to restart it, or to run it in another mode).
pub struct Idp {
    pub issuer: String,
    port: u16,
    state_dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop();
    }
}

static IDP: OnceLock<Idp> = OnceLock::new();

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl Idp {
    /// Starts oidc-provider once per test binary (PKCE required, rotation on).
    pub fn shared() -> &'static Idp {
        IDP.get_or_init(|| Idp::start(&[]))
    }

    /// Starts an oidc-provider of this test's own, with extra `IDP_*` settings.
    pub fn start(env: &[(&str, &str)]) -> Idp {
        let root = repo_root();
        assert!(root.join("idp/node_modules/oidc-provider").exists(), "the test IdP is not installed: run `npm ci --prefix idp`");
        let port = free_port();
        let idp = Idp {
            issuer: format!("http://127.0.0.1:{port}"),
            port,
            state_dir: tempfile::tempdir().unwrap().keep(),
            child: Mutex::new(None),
        };
        idp.run(env);
        idp
    }

    fn run(&self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.state_dir.join("idp.log")).unwrap();
        let mut command = Command::new("node");
        command
            .arg(repo_root().join("idp/server.mjs"))
            .env("IDP_PORT", self.port.to_string())
            .env("IDP_STATE_DIR", &self.state_dir)
            .env("IDP_CLIENT_ID", IDP_CLIENT_ID)
            .env("IDP_CLIENT_SECRET", IDP_CLIENT_SECRET)
            .env("IDP_REDIRECT_URIS", UPSTREAM_REDIRECT_URI)
            .env("IDP_TEST_CONTROL", "1")
            .env("IDP_PARENT_PID", std::process::id().to_string())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        *self.child.lock().unwrap() = Some(command.spawn().expect("node runs"));
        wait_for_port(self.port, "oidc-provider");
    }

    /// Stops the process (its grants and keys stay in its state directory).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port and state, with `env`.
    pub fn restart(&self, env: &[(&str, &str)]) {
        self.stop();
        self.run(env);
    }

    /// The next `count` requests for the key set answer 503.
    pub async fn fail_jwks(&self, count: u32) {
        let url = format!("{}/_test/jwks-fail?count={count}", self.issuer);
        assert!(reqwest::Client::new().post(url).send().await.unwrap().status().is_success());
    }

    pub async fn stats(&self) -> Value {
        json_of(reqwest::Client::new().get(format!("{}/_test/stats", self.issuer))).await
    }

    /// Refresh-token grants the IdP has answered so far for `account`.
    pub async fn refreshes(&self, account: &str) -> u64 {
        let url = format!("{}/_test/stats?account={account}", self.issuer);
        json_of(reqwest::Client::new().get(url)).await["refresh_token"].as_u64().unwrap()
    }

    /// The IdP's counters for one account (grants by type).
    pub async fn stats_of(&self, account: &str) -> Value {
        json_of(reqwest::Client::new().get(format!("{}/_test/stats?account={account}", self.issuer))).await
    }

    /// Kills every grant of `account` at the IdP; returns how many.
    pub async fn kill(&self, account: &str) -> u64 {
        let url = format!("{}/_test/kill?account={account}", self.issuer);
        json_of(reqwest::Client::new().post(url)).await["killed"].as_u64().unwrap()
    }
}

// ---------------------------------------------------------------- a mock hub

/// The hub's `/hub/api/user`, answering for the server tokens it was told.
pub struct HubMock {
    pub server: wiremock::MockServer,
}

impl HubMock {
    pub async fn start() -> Self {
        Self { server: wiremock::MockServer::start().await }
    }

    /// A server API token of `user`'s, known to the hub, with the scope a
    /// server's own token holds (`access:services!service=tokenhub`).
    pub async fn server_token(&self, user: &str) -> String {
        self.token_with(user, "user", &["access:services!service=tokenhub", "read:users:name!user"]).await
    }

    /// A token the hub knows for `user` (`kind` `user` or `service`) with
    /// these scopes in its `/hub/api/user` answer.
    pub async fn token_with(&self, user: &str, kind: &str, scopes: &[&str]) -> String {
        use wiremock::matchers::{header, method, path};
        let token = format!("server-token-{user}-{}", tokenhub::vault::crypto::random_token());
        wiremock::Mock::given(method("GET"))
            .and(path("/hub/api/user"))
            .and(header("authorization", format!("token {token}").as_str()))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "kind": kind, "name": user, "servers": {}, "scopes": scopes, "token_id": format!("a{}", &token[token.len() - 6..])
            })))
            .mount(&self.server)
            .await;
        token
    }

    /// Tells the hub that `user` is a member of `groups` (its
    /// `/hub/api/users/<name>`, as tokenhub's `read:users:groups` sees it).
    pub async fn member_of(&self, user: &str, groups: &[&str]) {
        use wiremock::matchers::{method, path};
        wiremock::Mock::given(method("GET"))
            .and(path(format!("/hub/api/users/{}", tokenhub::hub::path_segment(user))))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "kind": "user", "name": user, "servers": {}, "groups": groups
            })))
            .mount(&self.server)
            .await;
    }

    /// How many `/hub/api/user` calls the hub received.
    pub async fn user_calls(&self) -> usize {
        self.server.received_requests().await.unwrap_or_default().iter().filter(|r| r.url.path() == "/hub/api/user").count()
    }

    /// Tells the hub that `user` runs a ready default server at
    /// `/user/<user>/`, whose Contents API (behind the mock as proxy) takes
    /// the token file only with the server's own hub token, and hands that
    /// token to `app` as the spawn hook does. Returns the server's token.
    /// Users never named here run nothing (the hub says 404).
    pub async fn running(&self, app: &TestApp, user: &str) -> String {
        use wiremock::matchers::{header, method, path};
        let segment = tokenhub::hub::path_segment(user);
        wiremock::Mock::given(method("GET"))
            .and(path(format!("/hub/api/users/{segment}")))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "kind": "user", "name": user, "servers": {"": {"ready": true, "url": format!("/user/{segment}/")}}
            })))
            .mount(&self.server)
            .await;
        let server_token =
            self.token_with(user, "user", &[&format!("access:servers!server={user}/"), "access:services!service=tokenhub"]).await;
        wiremock::Mock::given(method("PUT"))
            .and(path(format!("/user/{segment}/api/contents/.tokens.json")))
            .and(header("authorization", format!("token {server_token}").as_str()))
            .respond_with(wiremock::ResponseTemplate::new(201))
            .mount(&self.server)
            .await;
        let response = Hub::spawn_call(app, user, "", &server_token).await;
        assert_eq!(response.status(), reqwest::StatusCode::OK, "the spawn call for {user}");
        server_token
    }

    /// Lets `user`'s server take any file or directory through its Contents
    /// API with its own hub token (the narrower-token files).
    pub async fn takes_files(&self, user: &str, server_token: &str) {
        use wiremock::matchers::{header, method, path_regex};
        let segment = regex_escape(&tokenhub::hub::path_segment(user));
        wiremock::Mock::given(method("PUT"))
            .and(path_regex(format!("^/user/{segment}/api/contents/.+")))
            .and(header("authorization", format!("token {server_token}").as_str()))
            .respond_with(wiremock::ResponseTemplate::new(201))
            .mount(&self.server)
            .await;
    }

    /// The contents written to `path` of `user`'s server so far, oldest
    /// first (`None` for a directory made there).
    pub async fn written(&self, user: &str, path: &str) -> Vec<Option<String>> {
        let wanted = format!("/user/{}/api/contents/{path}", tokenhub::hub::path_segment(user));
        let requests = self.server.received_requests().await.unwrap_or_default();
        requests
            .iter()
            .filter(|r| r.method.as_str() == "PUT" && r.url.path() == wanted)
            .map(|r| {
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                body["content"].as_str().map(str::to_string)
            })
            .collect()
    }

    /// The token files written into `user`'s server so far, oldest first.
    pub async fn token_files(&self, user: &str) -> Vec<Value> {
        let written = self.written(user, ".tokens.json").await;
        written.into_iter().map(|content| serde_json::from_str(&content.expect("a file")).unwrap()).collect()
    }
}

/// `text` with the characters a regular expression gives meaning escaped.
fn regex_escape(text: &str) -> String {
    text.chars().flat_map(|c| if "\\.+*?()|[]{}^$".contains(c) { vec!['\\', c] } else { vec![c] }).collect()
}

/// Makes a lineage look `seconds` older (issued and expiring earlier).
pub async fn age_lineage(app: &TestApp, user: &str, seconds: i64) {
    app.sql(&format!(
        "UPDATE lineages SET updated_at = updated_at - {seconds}, \
         refreshed_at = refreshed_at - {seconds}, access_expires_at = access_expires_at - {seconds} \
         WHERE username = '{user}'"
    ))
    .await;
    if let Some(state) = &app.state {
        state.vault.forget(user, state.upstream.issuer());
    }
}

// ---------------------------------------------------------------- PostgreSQL

/// A PostgreSQL server for this test binary: `TOKENHUB_TEST_POSTGRES_URL`
/// if set, else one started from Debian's packages in a temporary directory.
pub struct Postgres {
    url: String,
    /// The data directory and port of a server these tests started.
    server: Option<(PathBuf, PathBuf, u16)>,
    child: Mutex<Option<Child>>,
}

static POSTGRES: OnceLock<Postgres> = OnceLock::new();

fn postgres_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions.into_iter().rev().map(|bin| bin.join(name)).find(|p| p.exists()).unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a command as the `postgres` user when we are root (PostgreSQL
/// refuses to run as root).
fn as_postgres_user(program: &Path) -> Command {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc_getuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

unsafe extern "C" {
    #[link_name = "getuid"]
    fn libc_getuid() -> u32;
}

impl Postgres {
    /// The server of this test binary: `TOKENHUB_TEST_POSTGRES_URL` if set,
    /// else one started from Debian's packages.
    pub fn shared() -> &'static Postgres {
        POSTGRES.get_or_init(|| match std::env::var("TOKENHUB_TEST_POSTGRES_URL") {
            Ok(url) => Postgres { url, server: None, child: Mutex::new(None) },
            Err(_) => Postgres::private(),
        })
    }

    /// A server of the calling test's own, in a temporary directory (it may
    /// stop and start it).
    pub fn private() -> Postgres {
        let dir = tempfile::tempdir().unwrap().keep();
        let data = dir.join("data");
        let _ = Command::new("chown").arg("-R").arg("postgres").arg(&dir).status();
        let status = as_postgres_user(&postgres_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null())
            .status()
            .expect("initdb runs (apt-get install postgresql)");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let postgres = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}"),
            server: Some((dir, data, port)),
            child: Mutex::new(None),
        };
        postgres.start_again();
        postgres
    }

    /// Starts the server (again) on its port and data.
    pub fn start_again(&self) {
        let (dir, data, port) = self.server.as_ref().expect("a server these tests started");
        // The shell loop stops the server when this test process is gone (it
        // runs as another user, so it watches /proc rather than signalling).
        let script = format!(
            "\"$0\" -D \"$1\" -p {port} -k \"$2\" -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off -c max_connections=200 & pg=$!; \
             while [ -d /proc/{parent} ] && kill -0 $pg 2>/dev/null; do sleep 1; done; kill $pg",
            parent = std::process::id()
        );
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("postgres.log")).unwrap();
        let child = as_postgres_user(Path::new("sh"))
            .arg("-c")
            .arg(script)
            .arg(postgres_bin("postgres"))
            .arg(data)
            .arg(dir)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("postgres starts");
        *self.child.lock().unwrap() = Some(child);
        wait_for_port(*port, "PostgreSQL");
    }

    /// Stops the server at once, as a crash or a failover would (`pg_ctl
    /// stop -m immediate`).
    pub fn stop(&self) {
        let (_, data, _) = self.server.as_ref().expect("a server these tests started");
        let status = as_postgres_user(&postgres_bin("pg_ctl"))
            .arg("-D")
            .arg(data)
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl stop");
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.wait();
        }
    }

    /// A new, empty database; returns its URL.
    pub async fn new_database(&self) -> String {
        use sqlx::Connection;
        let name =
            format!("tokenhub_test_{}", &tokenhub::vault::crypto::random_token().to_lowercase().replace(['-', '_'], "")[..16]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = loop {
            match sqlx::PgConnection::connect(&format!("{}/postgres", self.url)).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("PostgreSQL does not accept connections: {e}"),
            }
        };
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.unwrap();
        format!("{}/{name}", self.url)
    }
}

// ---------------------------------------------------------------- browser and hub

/// A browser: keeps cookies, follows nothing by itself.
pub struct Browser {
    pub http: reqwest::Client,
}

impl Default for Browser {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a response redirects to.
pub fn location(response: &reqwest::Response) -> Url {
    let status = response.status();
    assert!(status.is_redirection(), "expected a redirect, got {status}");
    let value = response.headers().get(LOCATION).expect("Location header").to_str().unwrap();
    Url::parse(value).unwrap_or_else(|_| response.url().join(value).unwrap())
}

pub fn query(url: &Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

impl Browser {
    /// Every request is a top-level navigation typed into the address bar
    /// (what tokenhub's token page and download require).
    pub fn new() -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("sec-fetch-mode", "navigate".parse().unwrap());
        headers.insert("sec-fetch-dest", "document".parse().unwrap());
        headers.insert("sec-fetch-site", "none".parse().unwrap());
        Self {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .cookie_store(true)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    pub async fn get(&self, url: impl reqwest::IntoUrl) -> reqwest::Response {
        self.http.get(url).send().await.unwrap()
    }

    /// At the IdP: follows its redirects, signs in as `user` on the login
    /// form, and returns the redirect back to tokenhub's callback.
    pub async fn sign_in_at_idp(&self, mut url: Url, user: &str) -> Url {
        for _ in 0..10 {
            if url.as_str().starts_with(UPSTREAM_REDIRECT_URI) {
                return url;
            }
            let response = self.get(url.clone()).await;
            if response.status() == StatusCode::OK {
                let page = response.text().await.unwrap();
                assert!(page.contains("name=\"login\""), "expected the IdP login form, got: {page}");
                let action = url.join(&format!("{}/login", url.path())).unwrap();
                let response = self.http.post(action).form(&[("login", user), ("password", "x")]).send().await.unwrap();
                url = location(&response);
            } else {
                url = location(&response);
            }
        }
        panic!("the IdP did not send the browser back");
    }

    /// Delivers the IdP's redirect to `app`'s callback.
    pub async fn deliver_callback(&self, app: &TestApp, idp_redirect: &Url) -> reqwest::Response {
        let query = idp_redirect.query().unwrap_or("");
        self.get(format!("{}?{query}", app.url("/callback"))).await
    }
}

/// A hub login in progress: what the hub keeps between authorize and token.
pub struct HubLogin {
    pub state: String,
    pub verifier: String,
}

/// JupyterHub's side of the protocol.
pub struct Hub;

impl Hub {
    /// The hub's spawn hook calling tokenhub for `user`'s server `server`,
    /// handing over the server's own hub token.
    pub async fn spawn_call(app: &TestApp, user: &str, server: &str, server_token: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(app.url("/api/v1/hub/spawn"))
            .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
            .json(&serde_json::json!({"user": user, "server": server, "server_token": server_token}))
            .send()
            .await
            .unwrap()
    }

    /// The authorize URL the hub would send the browser to, with PKCE.
    pub fn authorize_url(app: &TestApp) -> (String, HubLogin) {
        let verifier = tokenhub::vault::crypto::random_token();
        let state = tokenhub::vault::crypto::random_token();
        let mut url = Url::parse(&app.url("/oauth2/authorize")).unwrap();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", HUB_CLIENT_ID)
            .append_pair("redirect_uri", HUB_REDIRECT_URI)
            .append_pair("state", &state)
            .append_pair("scope", "openid profile email")
            .append_pair("code_challenge", &pkce_s256(&verifier))
            .append_pair("code_challenge_method", "S256");
        (url.to_string(), HubLogin { state, verifier })
    }

    /// Browser goes hub → tokenhub → IdP → tokenhub → hub; returns the code.
    pub async fn login(app: &TestApp, browser: &Browser, user: &str) -> (String, HubLogin) {
        Self::login_at(app, Idp::shared(), browser, user).await
    }

    /// [`Hub::login`] through `idp`.
    pub async fn login_at(app: &TestApp, idp: &Idp, browser: &Browser, user: &str) -> (String, HubLogin) {
        let (url, login) = Self::authorize_url(app);
        let response = browser.get(url).await;
        let to_idp = location(&response);
        assert!(to_idp.as_str().starts_with(&format!("{}/auth", idp.issuer)), "{to_idp}");
        let back = browser.sign_in_at_idp(to_idp, user).await;
        let response = browser.deliver_callback(app, &back).await;
        let to_hub = location(&response);
        assert!(to_hub.as_str().starts_with(HUB_REDIRECT_URI), "expected the hub's callback, got {to_hub}");
        assert_eq!(query(&to_hub, "state").as_deref(), Some(login.state.as_str()));
        (query(&to_hub, "code").expect("code"), login)
    }

    /// The token request, with client_secret_basic.
    pub async fn exchange(app: &TestApp, form: &[(&str, &str)]) -> reqwest::Response {
        reqwest::Client::new()
            .post(app.url("/oauth2/token"))
            .basic_auth(HUB_CLIENT_ID, Some(HUB_CLIENT_SECRET))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    pub async fn exchange_code(app: &TestApp, code: &str, login: &HubLogin) -> reqwest::Response {
        Self::exchange(
            app,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", HUB_REDIRECT_URI),
                ("code_verifier", &login.verifier),
            ],
        )
        .await
    }

    pub async fn userinfo(app: &TestApp, access_token: &str) -> reqwest::Response {
        reqwest::Client::new().get(app.url("/oauth2/userinfo")).bearer_auth(access_token).send().await.unwrap()
    }
}

/// The origin of `app` (`http://127.0.0.1:port`), as a browser sends it.
/// The body of a 200 HTML page.
pub async fn html(response: reqwest::Response) -> String {
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    response.text().await.unwrap()
}

pub fn origin_of(app: &TestApp) -> String {
    Url::parse(&app.base).unwrap().origin().ascii_serialization()
}

/// Sends a request and reads its JSON answer.
pub async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Asserts an OAuth JSON error with this status and code; returns the body.
pub async fn assert_json_error(response: reqwest::Response, status: StatusCode, error: &str) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response.headers().get("content-type").unwrap().to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], error, "{body}");
    assert!(body["error_description"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
    body
}

/// Asserts a readable HTML error page with this status; returns its text.
pub async fn assert_error_page(response: reqwest::Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    let content_type = response.headers().get("content-type").unwrap().to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let page = response.text().await.unwrap();
    assert!(page.contains("id=\"error-title\""), "{page}");
    assert!(!page.contains("panicked") && !page.contains("RUST_BACKTRACE"), "{page}");
    page
}
