//! Putting the user's tokens where the notebook reads them: the token file
//! (`~/.tokens.json`) in each running server, written through the server's
//! Contents API. Written once a new server is ready, and again in every
//! running server whenever the lineage changes, so a file never keeps a token
//! tokenhub has rotated away.

use std::time::Duration;

use crate::hub::{HubError, ServerInfo};
use crate::state::AppState;
use crate::time::now;
use crate::tokens::deliveries::Delivery;
use crate::tokens::fabric;

/// How long to wait for a spawning server to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
const READY_POLL: Duration = Duration::from_millis(500);
/// Polls a server may be missing from the hub's list before we stop waiting.
const ABSENT_POLLS: u32 = 10;

/// Writes the user's current token file into one server.
async fn write_one(app: &AppState, username: &str, server: &ServerInfo) -> Result<Option<i64>, HubError> {
    let lineage = match app.vault.load(username, app.upstream.issuer()).await {
        Ok(Some(lineage)) => lineage,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::error!(user = %username, error = %e, "cannot read the lineage to write the token file");
            return Ok(None);
        }
    };
    let document = serde_json::to_string_pretty(&fabric::document(&lineage)).expect("JSON serializes");
    let written = app.hub.write_token_file(server, &document).await;
    app.metrics.token_file_write(written.is_ok());
    written?;
    let delivery = Delivery { server: server.name.clone(), version: lineage.version, at: now() };
    app.deliveries.record(username, delivery).await;
    tracing::info!(user = %username, server = %server.name, version = lineage.version, "token file written");
    Ok(Some(lineage.version))
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
