//! The narrower-token files kept fresh in each running server besides the
//! token file (`TOKENHUB_TOKEN_FILES`, and the bearer-token file of WLCG
//! Bearer Token Discovery). Each file's token is had through
//! [`super::narrow`] (the user's rules apply; one grant serves every file
//! and caller asking the same), rendered in the file's format, and written
//! whole through the server's Contents API with the server's own hub token,
//! on the token file's path ([`super::delivery`]). A file is rewritten when
//! its token changes; keep-alive asks for tokens with [`FILE_MIN_VALID`]
//! seconds (or half their lifetime) left, so a file is renewed before its
//! token expires.

use secrecy::{ExposeSecret, SecretString};

use crate::config::{BEARER_TOKEN_PATH, FileFormat, TokenFileSpec};
use crate::hub::ServerInfo;
use crate::state::AppState;
use crate::tokens::deliveries::FileState;
use crate::tokens::narrow::{self, NarrowRequest};
use crate::vault::crypto::digest_hex;
use crate::vault::narrow::NarrowToken;

/// Seconds a file's token must have left when keep-alive looks (or half
/// its lifetime, if less): a file is rewritten before it expires.
pub const FILE_MIN_VALID: i64 = 600;
/// The largest bare token file: XRootD refuses larger ones.
pub const MAX_BARE_BYTES: usize = 4096;

/// The file's path in one server: `{server}` is the server's name
/// (`default` for the default server).
pub fn path_in(spec: &TokenFileSpec, server: &str) -> String {
    spec.path.replace("{server}", if server.is_empty() { "default" } else { server })
}

/// The token a file holds for a member of `groups`: the bearer-token
/// file's comes from the first of their rules that names one, else from
/// the setting; a file with neither is not written for them.
pub fn request_for(app: &AppState, spec: &TokenFileSpec, groups: &[String]) -> Option<NarrowRequest> {
    if spec.path == BEARER_TOKEN_PATH
        && let Some(default) = super::rules::bearer_default(&app.config.narrow.rules, groups)
    {
        let scope = default.scope.as_deref();
        return NarrowRequest::parse(Some(scope.unwrap_or("")), Some(&default.audience)).ok().flatten();
    }
    if spec.scopes.is_empty() && spec.audience.is_none() {
        return None;
    }
    Some(NarrowRequest { scopes: spec.scopes.clone(), audience: spec.audience.clone() })
}

/// The files one user's servers get (path template and request), by their groups.
pub fn files_for<'a>(app: &'a AppState, groups: &[String]) -> Vec<(&'a TokenFileSpec, NarrowRequest)> {
    app.config.narrow.files.iter().filter_map(|spec| Some((spec, request_for(app, spec, groups)?))).collect()
}

/// The file's content for `token`, or why it cannot be written.
pub fn render(spec: &TokenFileSpec, token: &NarrowToken, issuer: &str) -> Result<String, String> {
    let value = token.access_token.expose_secret();
    match &spec.format {
        FileFormat::Bare if value.len() > MAX_BARE_BYTES => {
            Err(format!("the token has {} bytes, more than the {MAX_BARE_BYTES} a bare token file may hold", value.len()))
        }
        FileFormat::Bare => Ok(format!("{value}\n")),
        FileFormat::Json => Ok(serde_json::json!({
            "access_token": value,
            "token_type": "Bearer",
            "expires_at": token.expires_at,
            "scope": token.scopes,
            "audience": token.audience,
            "issuer": issuer,
        })
        .to_string()),
        FileFormat::Template(template) => Ok(template
            .replace("{issuer}", issuer)
            .replace("{scope}", &token.scopes)
            .replace("{audience}", token.audience.as_deref().unwrap_or(""))
            .replace("{expires_at}", &token.expires_at.map(|e| e.to_string()).unwrap_or_default())
            // Last, so a token's own text is never read as a placeholder.
            .replace("{access_token}", value)),
    }
}

/// Writes each configured file whose token changed into one server (under
/// the server's file lock, held by the caller in `state`). Failures are
/// logged: a file that cannot be had now is tried again next time.
pub(super) async fn write_files(
    app: &AppState,
    username: &str,
    server: &ServerInfo,
    credential: &SecretString,
    token_id: &str,
    state: &mut FileState,
) {
    if app.config.narrow.files.is_empty() {
        return;
    }
    let groups = match app.hub.groups(username).await {
        Ok(groups) => groups,
        Err(e) => {
            tracing::warn!(user = %username, error = %e, "token files not written: the hub did not say the user's groups");
            return;
        }
    };
    for (spec, request) in files_for(app, &groups) {
        let path = path_in(spec, &server.name);
        let token = match narrow::token(app, username, &request, narrow::Freshness::Renew(FILE_MIN_VALID)).await {
            Ok(token) => token,
            Err(e) => {
                tracing::warn!(user = %username, server = %server.name, path = %path, error = %e, "token file not written: no token for it");
                continue;
            }
        };
        let digest = digest_hex(token.access_token.expose_secret());
        if state.narrow.get(&path) == Some(&digest) {
            continue;
        }
        let content = match render(spec, &token, app.upstream.issuer()) {
            Ok(content) => content,
            Err(why) => {
                tracing::warn!(user = %username, path = %path, reason = %why, "token file not written");
                continue;
            }
        };
        if let Err(e) = write(app, server, &path, &content, credential, state).await {
            tracing::warn!(user = %username, server = %server.name, path = %path, error = %e, "token file not written");
            continue;
        }
        state.narrow.insert(path.clone(), digest);
        tracing::info!(user = %username, server = %server.name, path = %path, token_id = %token_id, "narrower-token file written");
        let detail = format!(
            "file {path:?} ({}) written into server {:?} with that server's own hub token {token_id}",
            request.key(),
            server.name
        );
        app.audit.record("token_file", Some(username), None, Some(&detail));
    }
}

/// Makes the file's directories (once per server start), then writes it.
async fn write(
    app: &AppState,
    server: &ServerInfo,
    path: &str,
    content: &str,
    credential: &SecretString,
    state: &mut FileState,
) -> Result<(), crate::hub::HubError> {
    let parts: Vec<&str> = path.split('/').collect();
    for depth in 1..parts.len() {
        let directory = parts[..depth].join("/");
        if !state.directories.contains(&directory) {
            // A folder that cannot be made is a file not written.
            app.hub.make_directory(server, &directory, credential).await.inspect_err(|_| app.metrics.token_file_write(false))?;
            state.directories.insert(directory);
        }
    }
    super::delivery::put(app, server, path, content, credential).await
}

/// Users looked at per page when keep-alive renews the files.
const USERS_PAGE: i64 = 500;

/// Renews the files in the running servers tokenhub holds the hub token
/// of (keep-alive calls this each round): the users whose held tokens near
/// their end (or who hold none yet) are visited, and each file whose token
/// has less than [`FILE_MIN_VALID`] (or half its lifetime) left gets a new
/// one; a user whose tokens are all fresh costs no call to the hub. Stops
/// early when the database fails (the next round tries again).
pub async fn renew_all(app: &AppState) -> Result<(), crate::vault::store::StoreError> {
    if app.config.narrow.files.is_empty() {
        return Ok(());
    }
    let mut after = String::new();
    loop {
        let users = app.vault.store().users_to_renew(crate::time::now(), FILE_MIN_VALID, &after, USERS_PAGE).await?;
        for user in &users {
            super::delivery::write_all(app, user).await;
        }
        match users.last() {
            Some(last) if users.len() as i64 == USERS_PAGE => after = last.clone(),
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: FileFormat) -> TokenFileSpec {
        TokenFileSpec {
            path: ".tokenhub/bt_{server}".into(),
            scopes: vec!["storage.read".into()],
            audience: Some("https://storage.example".into()),
            format,
            env: None,
        }
    }

    fn token(value: &str) -> NarrowToken {
        NarrowToken {
            access_token: value.to_string().into(),
            scopes: "storage.read".into(),
            audience: Some("https://storage.example".into()),
            expires_at: Some(1_900_000_000),
            obtained_at: 1_899_996_400,
        }
    }

    #[test]
    fn formats_and_paths() {
        let issuer = "https://idp.example";
        assert_eq!(render(&spec(FileFormat::Bare), &token("abc"), issuer).unwrap(), "abc\n");
        assert!(render(&spec(FileFormat::Bare), &token(&"x".repeat(MAX_BARE_BYTES + 1)), issuer).is_err());
        let eos = FileFormat::Template("oauth2:{access_token}:{issuer}/userinfo".into());
        assert_eq!(render(&spec(eos), &token("abc"), issuer).unwrap(), "oauth2:abc:https://idp.example/userinfo");
        // A token's text is never taken for a placeholder.
        let tricky = FileFormat::Template("{access_token} {issuer}".into());
        assert_eq!(render(&spec(tricky), &token("{issuer}"), issuer).unwrap(), "{issuer} https://idp.example");
        let json: serde_json::Value =
            serde_json::from_str(&render(&spec(FileFormat::Json), &token("abc"), issuer).unwrap()).unwrap();
        assert_eq!((json["access_token"].as_str(), json["expires_at"].as_i64()), (Some("abc"), Some(1_900_000_000)));
        assert_eq!(path_in(&spec(FileFormat::Bare), ""), ".tokenhub/bt_default");
        assert_eq!(path_in(&spec(FileFormat::Bare), "gpu"), ".tokenhub/bt_gpu");
    }
}
