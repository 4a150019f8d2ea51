//! The audit log: one structured line per security-relevant event (hub login
//! issued, tokens handed to a spawn, notebook fetch, refresh, rotation grace
//! used, invalid_grant, revoke, refused caller), with the user, the client
//! address, the lineage version and the request id. Never a token value:
//! callers pass names, numbers and fixed reasons only.
//!
//! `TOKENHUB_AUDIT_LOG` picks the sink: unset, the normal log (tracing target
//! `audit`); `stdout`; or a file path, appended as JSON lines.
//!
//! The request id and client address come from the request being served:
//! [`crate::request_frame`] puts them in a task-local ([`scope`]), so code
//! deep in the refresher need not carry them around.

use std::io::Write as _;
use std::sync::Mutex;

use serde_json::json;

use crate::config::AuditTarget;

/// The request an event belongs to.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// The client address (see [`crate::security::client_of`]).
    pub client: Option<String>,
}

tokio::task_local! {
    static CONTEXT: Context;
}

/// The current request's context (empty outside a request, e.g. in a
/// background delivery).
pub fn context() -> Context {
    CONTEXT.try_with(Clone::clone).unwrap_or_default()
}

/// The client address of the request being served.
pub fn client() -> Option<String> {
    CONTEXT.try_with(|c| c.client.clone()).ok().flatten()
}

/// Runs `future` (the rest of a request) with its [`Context`].
pub async fn scope<F: std::future::Future>(context: Context, future: F) -> F::Output {
    CONTEXT.scope(context, future).await
}

enum Sink {
    Log,
    Writer(Mutex<Box<dyn std::io::Write + Send>>),
}

/// Writes audit lines.
pub struct Audit {
    sink: Sink,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit")
    }
}

impl Audit {
    /// Opens the sink (a file is created if missing, mode 0600, and appended to).
    pub fn open(target: &AuditTarget) -> std::io::Result<Self> {
        let sink = match target {
            AuditTarget::Log => Sink::Log,
            AuditTarget::Stdout => Sink::Writer(Mutex::new(Box::new(std::io::stdout()))),
            AuditTarget::File(path) => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                Sink::Writer(Mutex::new(Box::new(options.open(path)?)))
            }
        };
        Ok(Self { sink })
    }

    /// Records `event` for `user` (lineage `version`, and a fixed `detail`
    /// such as a refusal reason). Never pass a token value.
    pub fn record(&self, event: &str, user: Option<&str>, version: Option<i64>, detail: Option<&str>) {
        // The request's context is read where it is, not copied.
        let written = CONTEXT.try_with(|c| self.write(event, user, version, detail, &c.request_id, &c.client));
        if written.is_err() {
            self.write(event, user, version, detail, &None, &None);
        }
    }

    fn write(
        &self,
        event: &str,
        user: Option<&str>,
        version: Option<i64>,
        detail: Option<&str>,
        request_id: &Option<String>,
        client: &Option<String>,
    ) {
        match &self.sink {
            Sink::Log => tracing::info!(
                target: "audit",
                event,
                user = user.unwrap_or("-"),
                client = client.as_deref().unwrap_or("-"),
                version = version.unwrap_or(-1),
                request_id = request_id.as_deref().unwrap_or("-"),
                detail = detail.unwrap_or(""),
                "audit"
            ),
            Sink::Writer(writer) => {
                let at =
                    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
                let line = json!({
                    "ts": at,
                    "event": event,
                    "user": user,
                    "client": client,
                    "version": version,
                    "request_id": request_id,
                    "detail": detail,
                });
                let mut writer = writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                // An audit line that cannot be written is logged, not fatal.
                if let Err(e) = writeln!(writer, "{line}").and_then(|_| writer.flush()) {
                    tracing::error!(error = %e, "writing the audit log failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_lines_are_json_with_the_request_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(&AuditTarget::File(path.clone())).unwrap();
        let context = Context { request_id: Some("rid-1".into()), client: Some("10.1.2.3".into()) };
        CONTEXT.scope(context, async { audit.record("notebook_fetch", Some("alice"), Some(3), None) }).await;
        audit.record("revoke", Some("bob"), None, Some("user asked"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "notebook_fetch");
        assert_eq!(lines[0]["user"], "alice");
        assert_eq!(lines[0]["client"], "10.1.2.3");
        assert_eq!(lines[0]["request_id"], "rid-1");
        assert_eq!(lines[0]["version"], 3);
        assert_eq!(lines[1]["client"], serde_json::Value::Null);
        assert_eq!(lines[1]["detail"], "user asked");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
