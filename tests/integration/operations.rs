//! The operator's database commands, run as the binary: `migrate` (twice is
//! harmless; a schema from a newer tokenhub is refused by `migrate`,
//! `serve` and `keys`, naming both versions), and `rekey` while two
//! replicas on PostgreSQL serve a steady stream of callers.

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use tokenhub::vault::crypto::KeyRing;

use crate::refresh_safety::Caller;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_tokenhub");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN).args(args).env_clear().envs(env.iter().copied()).stdin(Stdio::null()).output().unwrap()
}

/// A database command on `database` with the key list `keys`, off the
/// test's runtime (replicas keep serving meanwhile).
async fn in_background(args: &[&'static str], database: &str, keys: &str) -> Output {
    let (args, database, keys) = (args.to_vec(), database.to_string(), keys.to_string());
    tokio::task::spawn_blocking(move || run(&args, &[("TOKENHUB_DATABASE_URL", &database), ("TOKENHUB_CRYPT_KEY", &keys)]))
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn migrate_twice_is_harmless_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("vault.sqlite").display());
    let env = [("TOKENHUB_DATABASE_URL", url.as_str()), ("TOKENHUB_CRYPT_KEY", CRYPT_KEY)];
    let newest = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite")).unwrap().count();
    for _ in 0..2 {
        let out = run(&["migrate"], &env);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let said = format!("the schema is at migration {newest} (this tokenhub's newest: {newest})");
        assert!(text(&out.stdout).contains(&said), "{}", text(&out.stdout));
    }
    let out = run(&["keys"], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("key #1 ("), "{}", text(&out.stdout));

    // A newer tokenhub migrated the database further.
    use sqlx::Connection as _;
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer tokenhub', 1, x'00', 0)",
    )
    .execute(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    let said = format!("the database's schema is at migration 9999, newer than this tokenhub knows ({newest})");
    for command in ["migrate", "keys"] {
        let out = run(&[command], &env);
        assert_eq!(out.status.code(), Some(1), "{command}");
        assert!(text(&out.stderr).contains(&said), "{command}: {}", text(&out.stderr));
    }
    let port = free_port();
    let serve_env = serve_env(&Idp::shared().issuer, port, &url);
    let serve_env: Vec<(&str, &str)> = serve_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run(&["serve"], &serve_env);
    assert!(!out.status.success(), "serve refuses to start");
    assert!(text(&out.stderr).contains(&said), "{}", text(&out.stderr));
}

/// Replicas move from key list `old` to `new;old`; `rekey` runs while both
/// serve callers (reads and forced refreshes); then `keys` says the old key
/// seals nothing, and a replica with `new` alone serves every user.
#[tokio::test]
async fn rekey_while_two_replicas_serve_loses_nothing() {
    let idp = Idp::shared();
    let hub = HubMock::start().await;
    let database = Postgres::shared().new_database().await;
    let (old, new) = (CRYPT_KEY.to_string(), KeyRing::generate_key());
    let replica = async |keys: &str| {
        let keys = keys.to_string();
        TestApp::builder(&idp.issuer)
            .hub(&hub)
            .database(database.clone())
            .settings(|s| s.crypt_key = Some(keys.into()))
            .spawn()
            .await
    };
    let users: Vec<String> = (0..12).map(|i| format!("rekey{i:02}")).collect();
    {
        let before = replica(&old).await;
        for user in &users {
            let (code, login) = Hub::login_at(&before, idp, &Browser::new(), user).await;
            assert_eq!(Hub::exchange_code(&before, &code, &login).await.status(), StatusCode::OK);
            hub.running(&before, user).await;
        }
    }
    let both = format!("{new};{old}");
    let (b, c) = (replica(&both).await, replica(&both).await);
    let mut callers = Vec::new();
    for user in &users {
        callers.push(Caller::new(if callers.len() % 2 == 0 { &b } else { &c }, &hub, user).await);
    }

    // A steady stream of callers on both replicas while rekey runs.
    let (stop, served, failed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stream = {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let caller = &callers[i % callers.len()];
                let response = if i.is_multiple_of(7) { caller.force().await } else { caller.get("").await };
                if response.status() == StatusCode::OK {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed: {} {}", response.status(), response.text().await.unwrap_or_default());
                }
                i += 1;
            }
        }
    };
    let stream = tokio::spawn(stream);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = in_background(&["rekey"], &database, &both).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    stream.await.unwrap();

    assert_eq!(failed.load(Ordering::Relaxed), 0, "no caller failed");
    assert!(served.load(Ordering::Relaxed) >= 20, "{} calls served", served.load(Ordering::Relaxed));
    let rows: u64 = report.split(' ').next().unwrap().parse().unwrap();
    assert!(rows >= users.len() as u64, "{report}");
    let ids = KeyRing::parse(&both).unwrap().key_ids();
    assert!(
        report.contains(&format!("key #2 ({}): 0 stored values; seals nothing stored: it can be removed", ids[1])),
        "{report}"
    );
    let keys = text(&in_background(&["keys"], &database, &both).await.stdout);
    assert!(keys.contains(&format!("key #2 ({}): 0 stored values", ids[1])), "{keys}");

    // The old key dropped: every user's tokens are still served.
    let after = replica(&new).await;
    for user in &users {
        let response = Caller::new(&after, &hub, user).await.get("").await;
        assert_eq!(response.status(), StatusCode::OK, "{user}: {}", response.text().await.unwrap());
    }
}

/// PostgreSQL stopped at once (as a crash or a failover) and started again
/// while callers keep coming: while it is down, callers get JSON 503s with
/// `Retry-After` (or tokens still in the caches), never another error, and
/// the replica reports itself not ready (alive, saying why); within a few
/// seconds of its return every user is served again, a forced refresh works
/// for each (no lease left stuck) and no lineage is lost.
#[tokio::test]
async fn a_database_that_goes_away_and_comes_back_costs_only_503s() {
    let idp = Idp::shared();
    let hub = HubMock::start().await;
    let postgres = Postgres::private();
    let app = TestApp::builder(&idp.issuer).hub(&hub).database(postgres.new_database().await).spawn().await;
    let outage = Outage { begin: Box::new(|| postgres.stop()), end: Box::new(|| postgres.start_again()), unready: true };
    through_an_outage(&app, &hub, "outage", outage).await;
}

/// The SQLite file's disk fills up (a tmpfs of the test's own, filled to
/// the last byte) and is freed again while callers keep coming: the same
/// promise as for PostgreSQL: only 200s and JSON 503s with `Retry-After`,
/// normal service after, no stuck lease, no lineage lost. Reads still
/// work on a full disk, so the replica stays ready: it can still serve
/// tokens that need no refresh. Needs root (mount); fails, never skips.
///
/// This test found a lost write: sqlx's SQLite driver hands back the
/// `RETURNING` row of an UPDATE before the statement's COMMIT, which then
/// failed on the full disk unseen; the refresh was taken as stored, its
/// rotated refresh token lost, and the next refresh a 401 (one run in three
/// under load here). The store now reads such writes to their end.
#[tokio::test]
async fn a_full_disk_under_sqlite_costs_only_503s() {
    let disk = SmallDisk::mount(8);
    let idp = Idp::shared();
    let hub = HubMock::start().await;
    let url = format!("sqlite://{}?mode=rwc", disk.path.join("vault.sqlite").display());
    let app = TestApp::builder(&idp.issuer).hub(&hub).database(url).spawn().await;
    let filler = disk.path.join("filler");
    let outage = Outage {
        begin: Box::new(|| {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 64 * 1024];
            // Byte by byte at the end, so not one free block is left.
            while file.write_all(&block).is_ok() {}
            while file.write_all(&[0]).is_ok() {}
            let _ = file.sync_all();
        }),
        end: Box::new(|| std::fs::remove_file(&filler).unwrap()),
        unready: false,
    };
    through_an_outage(&app, &hub, "fulldisk", outage).await;
}

/// How a test's database goes away and comes back.
struct Outage<'a> {
    begin: Box<dyn FnOnce() + 'a>,
    end: Box<dyn FnOnce() + 'a>,
    /// Whether `/readyz` says 503 meanwhile (and `/healthz` says why).
    unready: bool,
}

/// Six users' callers keep asking (every third call a forced refresh)
/// while `outage` happens; then the promise above is checked.
async fn through_an_outage(app: &TestApp, hub: &HubMock, prefix: &str, outage: Outage<'_>) {
    let idp = Idp::shared();
    let users: Vec<String> = (0..6).map(|i| format!("{prefix}{i}")).collect();
    let mut callers = Vec::new();
    for user in &users {
        let (code, login) = Hub::login_at(app, idp, &Browser::new(), user).await;
        assert_eq!(Hub::exchange_code(app, &code, &login).await.status(), StatusCode::OK);
        callers.push(Caller::new(app, hub, user).await);
    }
    let callers = Arc::new(callers);
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (callers, stop) = (callers.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let caller = &callers[i % callers.len()];
                let response = if i.is_multiple_of(3) { caller.force().await } else { caller.get("").await };
                let status = response.status();
                let retry_after = response.headers().contains_key("retry-after");
                let body = response.text().await.unwrap_or_default();
                let json = serde_json::from_str::<serde_json::Value>(&body).is_ok();
                answers.push((status, retry_after, json, body));
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    (outage.begin)();
    tokio::time::sleep(Duration::from_secs(4)).await;
    if outage.unready {
        let down = reqwest::get(app.url("/readyz")).await.unwrap();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE, "not ready while the database is down");
        let health: serde_json::Value = reqwest::get(app.url("/healthz")).await.unwrap().json().await.unwrap();
        assert_eq!(health, serde_json::json!({"status": "ok", "database": "unavailable"}), "alive, and says why");
    }
    (outage.end)();
    let back = std::time::Instant::now();
    wait_until(Duration::from_secs(15), "ready again", async || {
        reqwest::get(app.url("/readyz")).await.unwrap().status() == StatusCode::OK
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = stream.await.unwrap();
    let recovered = back.elapsed();

    let unavailable = answers.iter().filter(|(s, _, _, _)| *s == StatusCode::SERVICE_UNAVAILABLE).count();
    assert!(unavailable > 0, "the outage was seen");
    for (status, retry_after, json, body) in &answers {
        assert!(*json, "every answer is JSON");
        match *status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => assert!(*retry_after, "a 503 says when to come back"),
            other => {
                let logs = logs();
                let told: Vec<&str> = logs.lines().filter(|l| l.contains("tokenhub::tokens")).collect();
                panic!(
                    "{other} during the outage: only 200 and 503 are expected: {body}\nwhat the refresher said:\n{}",
                    told.join("\n")
                )
            }
        }
    }
    assert!(recovered < Duration::from_secs(10), "ready {recovered:?} after the database's return");
    for (user, caller) in users.iter().zip(callers.iter()) {
        let before = app.state().vault.load(user, &idp.issuer).await.unwrap().unwrap();
        assert!(before.active, "{user}");
        let response = caller.force().await;
        assert_eq!(response.status(), StatusCode::OK, "{user}: {}", response.text().await.unwrap());
        assert_eq!(app.state().vault.load(user, &idp.issuer).await.unwrap().unwrap().version, before.version + 1);
    }
}

/// A tmpfs of `megabytes` mounted on a temporary directory for one test,
/// unmounted when dropped: a disk that can really fill up.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m,mode=0700"), "tokenhub-test"])
            .arg(dir.path())
            .output()
            .expect("mount(8) runs");
        assert!(out.status.success(), "this test mounts a small tmpfs (as root, as CI runs): {}", text(&out.stderr));
        Self { path: dir.path().to_path_buf(), _dir: dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("--lazy").arg(&self.path).status();
    }
}

/// A SQLite vault of 1,000 lineages moved into PostgreSQL by the binary:
/// every user's tokens open from PostgreSQL afterwards (and are served
/// through the API), the name bindings came along, and a second run copies
/// nothing twice.
#[tokio::test]
async fn import_sqlite_moves_a_thousand_lineages_to_postgresql() {
    use secrecy::ExposeSecret as _;
    use tokenhub::vault::{TokenSet, Vault};
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("vault.sqlite").display());
    let issuer = Idp::shared().issuer.clone();
    {
        let store = tokenhub::vault::store::Store::connect(&sqlite).await.unwrap();
        let vault = Vault::new(store.clone(), Arc::new(KeyRing::parse(CRYPT_KEY).unwrap()));
        for i in 0..1000 {
            let user = format!("moved{i:04}");
            let tokens = TokenSet {
                access_token: format!("access-{user}").into(),
                id_token: format!("id-{user}").into(),
                refresh_token: Some(format!("refresh-{user}").into()),
                access_expires_at: Some(tokenhub::time::now() + 3600),
                scope: "openid offline_access".into(),
                fabric: None,
            };
            let claims = serde_json::json!({ "preferred_username": user }).as_object().unwrap().clone();
            // As a sign-in does: the name bound to the subject, the tokens stored.
            store.bind_name(&user, &issuer, &format!("sub-{user}"), tokenhub::time::now()).await.unwrap();
            vault.save_login(&user, &issuer, &format!("sub-{user}"), &tokens, &claims, "nonce").await.unwrap();
        }
        // One lineage rotated 18 times: the FABRIC broker's digests of 16
        // replaced tokens (answered) and of 2 older ones (retired).
        let mut lineage = vault.load("moved0001", &issuer).await.unwrap().unwrap();
        for n in 0..18 {
            let tokens = TokenSet { refresh_token: Some(format!("rotated-{n}").into()), ..lineage.tokens.clone() };
            lineage = vault.save_refresh(&lineage, &tokens, None).await.unwrap().unwrap();
        }
    }
    let postgres = Postgres::shared().new_database().await;
    let env = [("TOKENHUB_DATABASE_URL", postgres.as_str())];
    let out = run(&["import-sqlite", "--from", &sqlite], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("copied 1000 lineages, 1000 name_bindings"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("16 refresh_predecessors, 2 retired_refresh_tokens"), "{}", text(&out.stdout));
    let again = run(&["import-sqlite", "--from", &sqlite], &env);
    assert!(text(&again.stdout).contains("copied 0 lineages, 0 name_bindings"), "{}", text(&again.stdout));

    let hub = HubMock::start().await;
    let app = TestApp::builder(&issuer).hub(&hub).database(postgres).spawn().await;
    let binding = app.state().vault.store().name_binding("moved0042", &issuer).await.unwrap().expect("the name's binding moved");
    assert_eq!(binding.subject, "sub-moved0042");
    for i in 0..1000 {
        let user = format!("moved{i:04}");
        let lineage = app.state().vault.load(&user, &issuer).await.unwrap().expect("moved");
        let current = if user == "moved0001" { "rotated-17".to_string() } else { format!("refresh-{user}") };
        assert_eq!(lineage.tokens.refresh_token.unwrap().expose_secret(), current);
        assert_eq!(lineage.subject, format!("sub-{user}"));
    }
    // The broker still tells a replaced token from a retired one.
    let owner = |token: &str| {
        let store = app.state().vault.store().clone();
        let hash = tokenhub::vault::crypto::digest_hex(token);
        async move { store.refresh_owner(&hash, 0).await.unwrap().expect("the digest moved") }
    };
    assert!(!owner("rotated-16").await.retired);
    assert!(owner("refresh-moved0001").await.retired);
    for user in ["moved0000", "moved0500", "moved0999"] {
        let response = Caller::new(&app, &hub, user).await.get("").await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["access_token"], format!("access-{user}"));
    }
}
