//! The store and vault behave the same on SQLite and on a real PostgreSQL server.

use std::sync::Arc;

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use tokenhub::time::now;
use tokenhub::vault::crypto::KeyRing;
use tokenhub::vault::store::{HubCodeRow, HubTokenKind, HubTokenRow, Store};
use tokenhub::vault::{TokenSet, Vault, VaultError};

use crate::support::*;

async fn backends() -> Vec<(&'static str, Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&format!("sqlite://{}?mode=rwc", dir.path().join("t.sqlite").display())).await.unwrap();
    let postgres = Store::connect(&Postgres::shared().new_database().await).await.unwrap();
    vec![("sqlite", sqlite, Some(dir)), ("postgres", postgres, None)]
}

fn tokens(tag: &str) -> TokenSet {
    TokenSet {
        access_token: format!("access-{tag}").into(),
        id_token: format!("id-{tag}").into(),
        refresh_token: Some(format!("refresh-{tag}").into()),
        access_expires_at: Some(now() + 300),
        scope: "openid offline_access".into(),
        fabric: None,
    }
}

fn claims(user: &str) -> Map<String, Value> {
    json!({ "preferred_username": user, "groups": ["users"] }).as_object().unwrap().clone()
}

#[tokio::test]
async fn lineages_are_versioned_and_replaced() {
    let keys = Arc::new(KeyRing::parse(CRYPT_KEY).unwrap());
    for (name, store, _dir) in backends().await {
        let vault = Vault::new(store, keys.clone());
        assert!(vault.load("alice", "https://idp").await.unwrap().is_none(), "{name}");
        let v1 = vault.save_login("alice", "https://idp", "sub-a", &tokens("1"), &claims("alice"), "nonce").await.unwrap();
        let v2 = vault.save_login("alice", "https://idp", "sub-a", &tokens("2"), &claims("alice"), "nonce").await.unwrap();
        assert_eq!((v1, v2), (1, 2), "{name}");
        let other_issuer =
            vault.save_login("alice", "https://other", "sub-x", &tokens("x"), &claims("alice"), "nonce").await.unwrap();
        assert_eq!(other_issuer, 1, "{name}: lineages are per issuer");
        let loaded = vault.load("alice", "https://idp").await.unwrap().unwrap();
        assert_eq!(loaded.version, 2, "{name}");
        assert_eq!(loaded.tokens.refresh_token.unwrap().expose_secret(), "refresh-2", "{name}");
        assert_eq!(loaded.claims["groups"], json!(["users"]), "{name}");
        assert!(loaded.active, "{name}");
    }
}

#[tokio::test]
async fn a_code_is_taken_once_even_by_concurrent_callers() {
    for (name, store, _dir) in backends().await {
        let code = HubCodeRow {
            code_hash: "h1".into(),
            username: "alice".into(),
            issuer: "https://idp".into(),
            client_id: "hub".into(),
            redirect_uri: "http://hub/cb".into(),
            code_challenge: Some("c".into()),
            scope: "openid".into(),
            expires_at: now() + 60,
        };
        store.insert_hub_code(&code).await.unwrap();
        let takers: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.take_hub_code("h1").await.unwrap() })
            })
            .collect();
        let mut won = 0;
        for t in takers {
            if let Some(row) = t.await.unwrap() {
                assert_eq!(row.code_challenge.as_deref(), Some("c"));
                won += 1;
            }
        }
        assert_eq!(won, 1, "{name}");
        assert!(store.take_hub_code("h1").await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn hub_tokens_are_found_taken_and_purged() {
    for (name, store, _dir) in backends().await {
        let row = |hash: &str, kind, expires_at| HubTokenRow {
            token_hash: hash.into(),
            kind,
            username: "alice".into(),
            issuer: "https://idp".into(),
            client_id: "hub".into(),
            scope: "openid".into(),
            expires_at,
            created_at: now(),
        };
        store.insert_hub_token(&row("a", HubTokenKind::Access, now() + 60)).await.unwrap();
        store.insert_hub_token(&row("r", HubTokenKind::Refresh, now() + 60)).await.unwrap();
        store.insert_hub_token(&row("old", HubTokenKind::Access, now() - 1)).await.unwrap();
        assert!(store.hub_token("a", HubTokenKind::Access, false).await.unwrap().is_some(), "{name}");
        assert!(store.hub_token("a", HubTokenKind::Refresh, false).await.unwrap().is_none(), "{name}: kinds differ");
        assert!(store.hub_token("r", HubTokenKind::Refresh, true).await.unwrap().is_some(), "{name}");
        assert!(store.hub_token("r", HubTokenKind::Refresh, true).await.unwrap().is_none(), "{name}: taken once");
        assert_eq!(store.purge_expired(now()).await.unwrap(), 1, "{name}");
        assert!(store.hub_token("a", HubTokenKind::Access, false).await.unwrap().is_some(), "{name}");
        store.ping().await.unwrap();
    }
}

#[tokio::test]
async fn a_sealed_value_moved_to_another_user_does_not_open() {
    let keys = Arc::new(KeyRing::parse(CRYPT_KEY).unwrap());
    let app = TestApp::builder(&Idp::shared().issuer).spawn().await;
    let vault = Vault::new(app.state().vault.store().clone(), keys);
    vault.save_login("alice", "https://idp", "a", &tokens("a"), &claims("alice"), "nonce").await.unwrap();
    vault.save_login("bob", "https://idp", "b", &tokens("b"), &claims("bob"), "nonce").await.unwrap();
    app.sql("UPDATE lineages SET refresh_token = (SELECT refresh_token FROM lineages WHERE username = 'alice') WHERE username = 'bob'").await;
    assert!(matches!(vault.load("bob", "https://idp").await, Err(VaultError::Crypto { .. })));
    assert!(vault.load("alice", "https://idp").await.unwrap().is_some());
    // A key list without the sealing key cannot open anything.
    let other = Vault::new(app.state().vault.store().clone(), Arc::new(KeyRing::parse(&KeyRing::generate_key()).unwrap()));
    assert!(matches!(other.load("alice", "https://idp").await, Err(VaultError::Crypto { .. })));
}

#[tokio::test]
async fn full_login_with_postgresql_as_the_vault() {
    let idp = Idp::shared();
    let app = TestApp::builder(&idp.issuer).database(Postgres::shared().new_database().await).spawn().await;
    let browser = Browser::new();
    let (code, login) = Hub::login(&app, &browser, "olivia").await;
    assert_eq!(Hub::exchange_code(&app, &code, &login).await.status(), StatusCode::OK);
    assert_json_error(Hub::exchange_code(&app, &code, &login).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    let lineage = app.state().vault.load("olivia", &idp.issuer).await.unwrap().unwrap();
    assert!(lineage.tokens.refresh_token.is_some());
}
