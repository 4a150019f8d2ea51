//! Putting the user's tokens where the notebook reads them: the token file
//! (`~/.tokens.json`) in each running server, written through the server's
//! Contents API with the server's own hub token. Written once a new server is ready, and again in every
//! running server whenever the lineage changes, so a file never keeps a token
//! tokenhub has rotated away.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::hub::{HubError, ServerInfo};
use crate::state::AppState;
use crate::time::now;
use crate::tokens::deliveries::{Delivery, FileState};
use crate::tokens::{fabric, sharing};
use crate::vault::crypto::digest_hex;

/// How long to wait for a spawning server to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
const READY_POLL: Duration = Duration::from_millis(500);
/// Polls a server may be missing from the hub's list before we stop waiting.
const ABSENT_POLLS: u32 = 10;

/// One write of a file (the token file, or a file of [`super::files`])
/// through the server's Contents API, counted in `/metrics`.
pub(super) async fn put(
    app: &AppState,
    server: &ServerInfo,
    path: &str,
    content: &str,
    credential: &SecretString,
) -> Result<(), HubError> {
    let written = app.hub.write_file(server, path, content, credential).await;
    app.metrics.token_file_write(written.is_ok());
    written
}

/// Writes the user's current token file into one server, with that
/// server's own hub API token (handed over by the spawn hook); a server
/// tokenhub holds no token of does not get the file. Writes into one server
/// are serialized and only move forward: under the server's lock the
/// current lineage is read, written if it is newer than what the file
/// holds, and read again after, until the file holds the newest version.
/// So concurrent refreshes coalesce, and the last write is the newest.
async fn write_one(app: &AppState, username: &str, server: &ServerInfo) -> Result<Option<i64>, HubError> {
    let credential = match app.vault.server_credential(username, &server.name).await {
        Ok(Some(credential)) => credential,
        Ok(None) => {
            tracing::warn!(
                user = %username, server = %server.name,
                "no hub token of this server: it was started before tokenhub took servers' own tokens, or its spawn hook did not run; the token file is written at its next start"
            );
            return Ok(None);
        }
        Err(e) => {
            tracing::error!(user = %username, error = %e, "cannot read the server's hub token");
            return Ok(None);
        }
    };
    let token_id = match app.hub.check_server_credential(&credential, username, &server.name).await? {
        Ok(token_id) => token_id,
        Err(why) => {
            tracing::warn!(user = %username, server = %server.name, reason = %why, "the server's hub token is not presented; token file not written");
            if let Err(e) = app.vault.forget_server_credential(username, &server.name).await {
                tracing::warn!(error = %e, "the refused server token was not forgotten");
            }
            return Ok(None);
        }
    };
    let slot = app.deliveries.file(username, &server.name);
    let mut file = slot.lock().await;
    let digest = digest_hex(credential.expose_secret());
    if file.credential != digest {
        // A new start of the server: its file is new.
        *file = FileState { credential: digest, ..FileState::default() };
    }
    // A shared server gets a note instead of the tokens (once), and the
    // tokens again once it is no longer shared.
    let withheld = sharing::withheld(app, username, &server.name).await?;
    app.deliveries.set_withheld(username, &server.name, withheld).await;
    if withheld {
        if !file.withheld {
            put(app, server, app.hub.token_file(), &sharing::note(username, app), &credential).await?;
            file.version = None;
            file.withheld = true;
            tracing::info!(user = %username, server = %server.name, token_id = %token_id, "token file withheld: the server is shared");
            app.audit.record("token_file_withheld", Some(username), None, Some("the server is shared: its token file is a note"));
        }
        return Ok(None);
    }
    file.withheld = false;
    loop {
        let lineage = match app.vault.load(username, app.upstream.issuer()).await {
            Ok(Some(lineage)) => lineage,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::error!(user = %username, error = %e, "cannot read the lineage to write the token file");
                return Ok(None);
            }
        };
        if file.version.is_some_and(|written| written >= lineage.version) {
            break;
        }
        let document = serde_json::to_string_pretty(&fabric::document(&lineage, app.custody())).expect("JSON serializes");
        put(app, server, app.hub.token_file(), &document, &credential).await?;
        file.version = Some(lineage.version);
        let delivery = Delivery { server: server.name.clone(), version: lineage.version, at: now() };
        app.deliveries.record(username, delivery).await;
        tracing::info!(user = %username, server = %server.name, version = lineage.version, token_id = %token_id, "token file written");
        let detail = format!("token file written into server {:?} with that server's own hub token {token_id}", server.name);
        app.audit.record("token_file", Some(username), Some(lineage.version), Some(&detail));
    }
    super::files::write_files(app, username, server, &credential, &token_id, &mut file).await;
    // Once per start of the server: FABlib reads its host from fabric_rc first.
    if !file.rc_checked {
        file.rc_checked = true;
        if let Some(named) = fabric::point_rc(app, username, server, &credential).await {
            app.deliveries.note_rc_change(username, &server.name, named).await;
        }
    }
    Ok(file.version)
}

/// Rewrites the token file in every ready server of the user; returns the
/// names of the servers that got it. Failures are logged, not returned: a
/// server that is stopping must not fail a refresh.
pub async fn write_all(app: &AppState, username: &str) -> Vec<String> {
    if !app.hub.configured() {
        return vec![];
    }
    let servers = match app.hub.servers(username).await {
        Ok(servers) => servers,
        Err(e) => {
            tracing::warn!(user = %username, error = %e, "cannot list the user's servers");
            return vec![];
        }
    };
    if servers.is_empty() {
        app.deliveries.forget_user(username).await;
    }
    let mut written = vec![];
    for server in servers.iter().filter(|s| s.ready) {
        match write_one(app, username, server).await {
            Ok(Some(_)) => written.push(server.name.clone()),
            Ok(None) => {}
            Err(e) => tracing::warn!(user = %username, server = %server.name, error = %e, "token file not written"),
        }
    }
    written
}

/// Waits in the background for a spawning server to become ready, then
/// writes its token file. One waiter per server.
pub fn write_when_ready(app: AppState, username: String, server_name: String) {
    if !app.hub.configured() {
        tracing::warn!("the hub API is not configured: token files are not written");
        return;
    }
    tokio::spawn(async move {
        let key = (username.clone(), server_name.clone());
        if !app.deliveries.start_waiting(&key).await {
            return;
        }
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut outcome = Err("the server did not become ready in time".to_string());
        let mut absent = 0;
        while tokio::time::Instant::now() < deadline {
            match app.hub.servers(&username).await {
                Ok(servers) => match servers.iter().find(|s| s.name == server_name) {
                    Some(server) if server.ready => {
                        outcome = write_one(&app, &username, server).await.map(|_| ()).map_err(|e| e.to_string());
                        break;
                    }
                    Some(_) => absent = 0,
                    // Gone for a while: the spawn failed or the server was stopped.
                    None if absent >= ABSENT_POLLS => {
                        outcome = Err("the server went away before it was ready".into());
                        break;
                    }
                    None => absent += 1,
                },
                Err(e) => tracing::debug!(error = %e, "waiting for the server: hub not answering"),
            }
            tokio::time::sleep(READY_POLL).await;
        }
        if let Err(e) = outcome {
            tracing::warn!(user = %username, server = %server_name, error = %e, "token file not written");
        }
        app.deliveries.stop_waiting(&key).await;
    });
}
