//! What a FABRIC user's server gets: the Credential Manager token document
//! (`~/.tokens.json`), which FABlib (`fabrictestbed`) reads unchanged; and,
//! with the broker ([`crate::fabric`]), the broker's host in the environment
//! (`FABRIC_CREDMGR_HOST`) and in the user's `fabric_rc`, which FABlib reads
//! before the environment: that one line changed, the rest left as it is.

use secrecy::ExposeSecret;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;

use secrecy::SecretString;
use serde_json::Map;

use crate::hub::ServerInfo;
use crate::state::AppState;
use crate::vault::Lineage;
use crate::vault::crypto::digest_hex;

/// FABRIC's timestamp format, `%Y-%m-%d %H:%M:%S %z` (`2026-06-04 13:09:25 +0000`).
pub fn timestamp(unix: i64) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]");
    OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(&format)
        .expect("the format has only numeric fields")
}

/// When the ID token expires: its `exp`, else the access token's expiry.
pub fn id_token_expiry(lineage: &Lineage) -> Option<i64> {
    crate::oauth::upstream::jwt_claims(lineage.tokens.id_token.expose_secret())
        .ok()
        .and_then(|claims| claims.get("exp").and_then(Value::as_i64))
        .or(lineage.tokens.access_expires_at)
}

/// Where FABlib's Jupyter examples keep the user's configuration.
pub const FABRIC_RC: &str = "work/fabric_config/fabric_rc";

/// The document for a lineage: the Credential Manager's own answer when the
/// tokens came through it, else one made like it. `state` is `Valid` for
/// tokens from a login and `Refreshed` once they come from a refresh, as
/// the Credential Manager says. In custody (`custody`) it holds no refresh
/// token.
pub fn document(lineage: &Lineage, custody: bool) -> Value {
    let refresh_token = lineage.tokens.refresh_token.as_ref().filter(|_| !custody);
    if let Some(held) = &lineage.tokens.fabric {
        return Value::Object(held.object(refresh_token));
    }
    let id_token = lineage.tokens.id_token.expose_secret();
    let issued = lineage.refreshed_at.unwrap_or(lineage.updated_at);
    let mut document = json!({
        "id_token": id_token,
        "refresh_token": refresh_token.map(|t| t.expose_secret()),
        "access_token": lineage.tokens.access_token.expose_secret(),
        "created_at": timestamp(issued),
        "expires_at": timestamp(id_token_expiry(lineage).unwrap_or(issued)),
        "state": if lineage.refreshed_at.is_some() { "Refreshed" } else { "Valid" },
        "token_hash": digest_hex(id_token),
        "comment": format!("issued by tokenhub for {} (lineage version {})", lineage.username, lineage.version),
        "created_from": "tokenhub",
    });
    if refresh_token.is_none() {
        document.as_object_mut().map(|d| d.remove("refresh_token"));
    }
    document
}

const VARIABLE: &str = "FABRIC_CREDMGR_HOST";

/// The broker's variables for a spawning server's environment.
pub fn add_env(app: &AppState, env: &mut Map<String, Value>) {
    if let Some(host) = app.config.fabric.as_ref().and_then(|f| f.broker_host.as_ref()) {
        env.insert(VARIABLE.into(), Value::String(host.clone()));
    }
}

/// In a FABRIC deployment, a lineage without a Credential Manager answer
/// (a new login) gets one in the background, so the server's token file
/// holds a FABRIC JWT from the start (in custody, FABlib cannot ask for one
/// itself). The refresh rewrites the servers' files when it is done.
pub fn prefetch(app: &AppState, lineage: &Lineage) {
    let Some(fabric) = app.config.fabric.as_ref() else {
        return;
    };
    if lineage.tokens.fabric.is_some() || !lineage.active {
        return;
    }
    let (app, user, min_valid) = (app.clone(), lineage.username.clone(), fabric.min_valid);
    tokio::spawn(async move {
        let want = crate::tokens::refresh::Want { min_valid: Some(min_valid), force: false };
        let ask = crate::oauth::credmgr::CmAsk::of(None);
        if let Err(e) = app.refresher.fresh_for_cm(&app, &user, want, ask).await {
            tracing::warn!(user = %user, error = %e, "no FABRIC token could be had for the new server yet");
        }
    });
}

/// `text` with its `FABRIC_CREDMGR_HOST=…` line naming `host`, and the host
/// it named; `None` when no line names another host.
pub fn pointed_at(text: &str, host: &str) -> Option<(String, String)> {
    let mut changed = None;
    let lines: Vec<String> = text
        .split_inclusive('\n')
        .map(|line| {
            let body = line.trim_end_matches(['\n', '\r']);
            let ending = &line[body.len()..];
            let indent = &body[..body.len() - body.trim_start().len()];
            let rest = body.trim_start();
            let (export, rest) = match rest.strip_prefix("export ") {
                Some(r) => ("export ", r.trim_start()),
                None => ("", rest),
            };
            let Some(value) = rest.strip_prefix(VARIABLE).and_then(|r| r.trim_start().strip_prefix('=')) else {
                return line.to_string();
            };
            let named = value.trim().trim_matches(['"', '\'']).to_string();
            if named == host || changed.is_some() {
                return line.to_string();
            }
            changed = Some(named);
            format!("{indent}{export}{VARIABLE}={host}{ending}")
        })
        .collect();
    changed.map(|named| (lines.concat(), named))
}

/// Points the server's `fabric_rc` at the broker if it names another host
/// (a file that is not there is left so); returns the host it named.
pub async fn point_rc(app: &AppState, username: &str, server: &ServerInfo, credential: &SecretString) -> Option<String> {
    let fabric = app.config.fabric.as_ref().filter(|f| f.edit_rc)?;
    let host = fabric.broker_host.as_ref()?;
    let text = match app.hub.read_file(server, FABRIC_RC, credential).await {
        Ok(Some(text)) => text,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(user = %username, server = %server.name, error = %e, "fabric_rc could not be read");
            return None;
        }
    };
    let (text, named) = pointed_at(&text, host)?;
    if let Err(e) = app.hub.write_file(server, FABRIC_RC, &text, credential).await {
        tracing::warn!(user = %username, server = %server.name, error = %e, "fabric_rc could not be pointed at the broker");
        return None;
    }
    tracing::info!(user = %username, server = %server.name, was = %named, "fabric_rc pointed at the broker");
    let detail = format!("{FABRIC_RC} of server {:?}: {VARIABLE} {named} -> {host}", server.name);
    app.audit.record("fabric_rc", Some(username), None, Some(&detail));
    Some(named)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RC: &str = "export FABRIC_ORCHESTRATOR_HOST=orchestrator.fabric-testbed.net\n\
                      export FABRIC_CREDMGR_HOST=cm.fabric-testbed.net\r\n\
                      export FABRIC_PROJECT_ID=abc\n\
                      # export FABRIC_CREDMGR_HOST=old\n";

    #[test]
    fn only_the_hosts_line_changes() {
        let (text, named) = pointed_at(RC, "broker.example.org").unwrap();
        assert_eq!(named, "cm.fabric-testbed.net");
        assert_eq!(
            text,
            "export FABRIC_ORCHESTRATOR_HOST=orchestrator.fabric-testbed.net\n\
             export FABRIC_CREDMGR_HOST=broker.example.org\r\n\
             export FABRIC_PROJECT_ID=abc\n\
             # export FABRIC_CREDMGR_HOST=old\n"
        );
        assert_eq!(pointed_at(&text, "broker.example.org"), None, "once pointed, left alone");
        assert_eq!(pointed_at("FABRIC_PROJECT_ID=abc", "b"), None);
        let (text, _) = pointed_at("  FABRIC_CREDMGR_HOST = \"cm\"", "b").unwrap();
        assert_eq!(text, "  FABRIC_CREDMGR_HOST=b");
    }

    #[test]
    fn timestamps_use_fabrics_format() {
        assert_eq!(timestamp(1_780_578_565), "2026-06-04 13:09:25 +0000");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 +0000");
    }
}

/// Property tests of the token file's timestamps.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use time::PrimitiveDateTime;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Every timestamp the document carries parses back with FABRIC's
        /// `%Y-%m-%d %H:%M:%S %z` to the same instant (years 1970–9999).
        #[test]
        fn timestamps_parse_back(unix in 0i64..253_402_300_799) {
            let text = timestamp(unix);
            let format = format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]"
            );
            let parsed = OffsetDateTime::parse(&text, &format).unwrap();
            prop_assert_eq!(parsed.unix_timestamp(), unix);
            prop_assert_eq!(text.len(), 25);
            // Python's strptime view of it: the fields without the offset.
            let plain = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
            prop_assert!(PrimitiveDateTime::parse(&text[..19], &plain).is_ok());
            prop_assert!(text.ends_with(" +0000"));
        }

        /// Out-of-range instants do not panic (they fall back to the epoch).
        #[test]
        fn any_instant_formats(unix in any::<i64>()) {
            prop_assert_eq!(timestamp(unix).len() >= 25, true);
        }
    }
}
