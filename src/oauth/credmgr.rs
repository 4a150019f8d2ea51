//! The FABRIC Credential Manager as tokenhub calls it: a refresh (which
//! the CM makes at CILogon with its client, answering a FABRIC JWT and the
//! new CILogon refresh token), and any other call passed on unchanged.
//!
//! A refresh is never sent twice once it may have reached the CM: the CM
//! refreshes at CILogon on receipt, so a second try with the same refresh
//! token could be a replay. Only a connection that never opened is retried.

use std::time::Duration;

use axum::http::{HeaderMap, Method, header};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use url::Url;

use crate::oauth::upstream::{UpstreamError, jwt_claims};
use crate::time::now;
use crate::vault::fabric::FabricToken;

/// The most of a CM answer read (its token documents are a few KB).
const MAX_ANSWER: usize = 256 * 1024;
/// Attempts at opening a connection to the CM for one refresh.
const CONNECT_ATTEMPTS: u32 = 3;

/// What a refresh asks the CM for: FABlib's query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmAsk {
    /// `project_id`, if given.
    pub project_id: Option<String>,
    /// `project_name`, if given.
    pub project_name: Option<String>,
    /// `scope` (FABlib sends `all`).
    pub scope: String,
}

impl CmAsk {
    /// The query string of a refresh for this ask.
    pub fn query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(p) = &self.project_id {
            query.append_pair("project_id", p);
        }
        if let Some(p) = &self.project_name {
            query.append_pair("project_name", p);
        }
        query.append_pair("scope", &self.scope);
        query.finish()
    }

    /// What the stored answer was asked for, or FABlib's default (`scope=all`).
    pub fn of(held: Option<&FabricToken>) -> CmAsk {
        match held {
            Some(t) => CmAsk { project_id: t.project_id.clone(), project_name: t.project_name.clone(), scope: t.scope.clone() },
            None => CmAsk { scope: "all".into(), ..Default::default() },
        }
    }
}

/// Phrases of the CM's answer when CILogon refused the refresh token.
const REFUSALS: [&str; 4] = ["invalid_grant", "invalid or has expired", "refresh token is expired", "token has been revoked"];

/// Whether a CM error text says the refresh token itself was refused.
pub fn is_refusal(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    REFUSALS.iter().any(|p| lower.contains(p))
}

/// The CM's error text: its `errors[].details` (or `message`), else the body.
pub fn error_text(body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let details = parsed.as_ref().and_then(|v| v.get("errors")).and_then(Value::as_array).map(|errors| {
        errors
            .iter()
            .filter_map(|e| e.get("details").or_else(|| e.get("message")).and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("; ")
    });
    match details.filter(|d| !d.is_empty()) {
        Some(d) => d,
        None => String::from_utf8_lossy(&body[..body.len().min(500)]).trim().to_string(),
    }
}

/// The CM's error text without the refresh token it may carry, and that
/// token: when the CM refreshed at CILogon and then failed (making the
/// FABRIC token), it answers `error: …, refresh_token: <new token>`.
pub fn take_refresh_token(text: &str) -> (String, Option<SecretString>) {
    const MARK: &str = "refresh_token: ";
    let Some(at) = text.find(MARK) else {
        return (text.to_string(), None);
    };
    let rest = &text[at + MARK.len()..];
    let end = rest.find(|c: char| c.is_whitespace() || matches!(c, ',' | '\'' | '"' | ';')).unwrap_or(rest.len());
    let token = &rest[..end];
    let clean = format!("{}{MARK}[token]{}", &text[..at], &rest[end..]);
    let token = (!token.is_empty() && token != "None").then(|| SecretString::from(token.to_string()));
    (clean, token)
}

/// The Credential Manager's client.
#[derive(Debug, Clone)]
pub struct CredMgr {
    /// `…/credmgr/`.
    base: Url,
    http: reqwest::Client,
}

impl CredMgr {
    /// A client for the CM at `url` (its base, without `/credmgr`).
    pub fn new(url: &Url, http: reqwest::Client) -> Self {
        let base = Url::parse(&format!("{}/credmgr/", url.as_str().trim_end_matches('/'))).expect("a URL with a path appended");
        Self { base, http }
    }

    /// The URL of a CM path such as `tokens/refresh`, with `query`.
    pub fn url(&self, path: &str, query: Option<&str>) -> Url {
        let mut url = self.base.join(path.trim_start_matches('/')).unwrap_or_else(|_| self.base.clone());
        url.set_query(query.filter(|q| !q.is_empty()));
        url
    }

    /// A refresh at the CM. A refusal of the refresh token is
    /// `InvalidGrant` with the CM's words; an answer that may have spent the
    /// token but cannot be used is `AnswerLost`.
    pub async fn refresh(&self, refresh_token: &SecretString, ask: &CmAsk) -> Result<FabricToken, UpstreamError> {
        let url = self.url("tokens/refresh", Some(&ask.query()));
        let body = json!({ "refresh_token": refresh_token.expose_secret() });
        let mut attempt = 1;
        let response = loop {
            match self.http.post(url.clone()).header(header::ACCEPT, "application/json").json(&body).send().await {
                Ok(response) => break response,
                // Nothing reached the CM: worth another try.
                Err(e) if e.is_connect() && attempt < CONNECT_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(e) if e.is_connect() => {
                    return Err(UpstreamError::Unreachable(format!("the Credential Manager: {}", e.without_url())));
                }
                // The request may have reached it: its refresh may be done.
                Err(e) => {
                    return Err(UpstreamError::AnswerLost(format!("the Credential Manager's answer: {}", e.without_url())));
                }
            }
        };
        let status = response.status();
        let bytes = read_bounded(response).await;
        if !status.is_success() {
            let bytes = bytes.unwrap_or_default();
            let (text, rotated) = take_refresh_token(&error_text(&bytes));
            if let Some(refresh_token) = rotated {
                return Err(UpstreamError::RotatedOnly { refresh_token, why: format!("it answered {status}: {text}") });
            }
            return Err(if is_refusal(&text) {
                UpstreamError::InvalidGrant(format!("the Credential Manager answered {status}: {text}"))
            } else if matches!(status.as_u16(), 429 | 502 | 503) {
                // Its proxy answered: the CM did not take the request.
                UpstreamError::Unreachable(format!("the Credential Manager answered {status}: {text}"))
            } else if status.is_server_error() {
                // The CM's own failure (or a gateway timeout) may come after
                // its refresh at CILogon: the token may be spent.
                UpstreamError::AnswerLost(format!("the Credential Manager answered {status}: {text}"))
            } else {
                UpstreamError::BadResponse(format!("the Credential Manager answered {status}: {text}"))
            });
        }
        let lost = |why: &str| UpstreamError::AnswerLost(format!("the Credential Manager's {status} answer {why}"));
        let bytes = bytes.map_err(|_| lost("could not be read"))?;
        let document: Value = serde_json::from_slice(&bytes).map_err(|_| lost("is not JSON"))?;
        let token = document
            .get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
            .and_then(Value::as_object)
            .ok_or_else(|| lost("holds no token"))?;
        parse_token(token.clone(), ask).ok_or_else(|| lost("holds no FABRIC JWT and refresh token"))
    }

    /// Passes a call on to the CM unchanged (method, path, query, the
    /// headers a CM call uses, body) and returns its answer.
    pub async fn forward(
        &self,
        method: Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: axum::body::Bytes,
    ) -> Result<(reqwest::StatusCode, HeaderMap, Vec<u8>), UpstreamError> {
        let mut request = self.http.request(method, self.url(path, query)).body(body);
        for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT, header::COOKIE] {
            for value in headers.get_all(&name) {
                request = request.header(&name, value);
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(format!("the Credential Manager: {}", e.without_url())))?;
        let status = response.status();
        let mut kept = HeaderMap::new();
        for name in [header::CONTENT_TYPE, header::SET_COOKIE, header::CACHE_CONTROL] {
            for value in response.headers().get_all(&name) {
                kept.append(&name, value.clone());
            }
        }
        let body = read_bounded(response)
            .await
            .map_err(|_| UpstreamError::Unreachable("the Credential Manager's answer could not be read".into()))?;
        Ok((status, kept, body))
    }
}

/// A CM token object as tokenhub keeps it: it must carry a FABRIC JWT
/// (`id_token`, with `exp`) and a refresh token.
pub fn parse_token(token: Map<String, Value>, ask: &CmAsk) -> Option<FabricToken> {
    let jwt = token.get("id_token").and_then(Value::as_str).filter(|t| !t.is_empty())?;
    token.get("refresh_token").and_then(Value::as_str).filter(|t| !t.is_empty())?;
    let expires_at = jwt_claims(jwt).ok()?.get("exp").and_then(Value::as_i64).unwrap_or_else(|| now() + 3600);
    Some(FabricToken {
        project_id: ask.project_id.clone(),
        project_name: ask.project_name.clone(),
        scope: ask.scope.clone(),
        expires_at,
        token: serde_json::to_string(&token).ok()?.into(),
    })
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_outages() {
        let refused = br#"{"errors":[{"message":"Internal Server Error","details":"(invalid_grant) Refresh token is invalid or has expired"}],"size":1,"status":500,"type":"error"}"#;
        let text = error_text(refused);
        assert_eq!(text, "(invalid_grant) Refresh token is invalid or has expired");
        assert!(is_refusal(&text));
        assert!(!is_refusal(&error_text(b"upstream connect error or disconnect/reset before headers")));
        assert!(!is_refusal(&error_text(br#"{"errors":[{"message":"Scope x is not allowed!"}]}"#)));
    }

    #[test]
    fn a_refresh_token_in_the_cms_error_is_taken_out() {
        let (text, token) = take_refresh_token("error: project registry down, refresh_token: NEW-123");
        assert_eq!(text, "error: project registry down, refresh_token: [token]");
        assert_eq!(token.map(|t| t.expose_secret().to_string()).as_deref(), Some("NEW-123"));
        let (text, token) = take_refresh_token("error: x, refresh_token: None");
        assert!(token.is_none() && !text.contains("None"));
        assert_eq!(take_refresh_token("plain").0, "plain");
    }

    #[test]
    fn a_token_needs_a_jwt_and_a_refresh_token() {
        let ask = CmAsk { scope: "all".into(), ..Default::default() };
        let jwt = "eyJhbGciOiJub25lIn0.eyJleHAiOjQxMDI0NDQ4MDB9.";
        let token = |v: Value| v.as_object().unwrap().clone();
        let parsed = parse_token(token(json!({"id_token": jwt, "refresh_token": "r"})), &ask).unwrap();
        assert_eq!(parsed.expires_at, 4_102_444_800);
        assert!(parse_token(token(json!({"id_token": jwt})), &ask).is_none());
        assert!(parse_token(token(json!({"refresh_token": "r"})), &ask).is_none());
        assert!(!format!("{parsed:?}").contains(jwt), "Debug shows no token");
    }
}
