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

/// The most fetch lines waiting for the writer thread (the queue's memory
/// is taken at start: about 150 bytes a line); a caller finding it full
/// waits for room (a line is never dropped).
const QUEUE: usize = 4096;

/// What the writer thread is handed.
enum Queued {
    Line(Line),
    /// Answered once every line queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// An audit line, owned (for the writer thread).
struct Line {
    at: time::OffsetDateTime,
    event: &'static str,
    user: Option<String>,
    version: Option<i64>,
    detail: Option<String>,
    request_id: Option<String>,
    client: Option<String>,
}

/// Writes audit lines: most as they happen, the one line of every notebook
/// fetch (the hot path's) on a thread of its own ([`Audit::record_off_path`]).
pub struct Audit {
    sink: std::sync::Arc<Sink>,
    queue: std::sync::mpsc::SyncSender<Queued>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit")
    }
}

impl Audit {
    /// Opens the sink (a file is created if missing, mode 0600, and appended
    /// to) and starts the writer thread of fetch lines.
    pub fn open(target: &AuditTarget) -> std::io::Result<Self> {
        let sink = std::sync::Arc::new(match target {
            AuditTarget::Log => Sink::Log,
            AuditTarget::Stdout => Sink::Writer(Mutex::new(Box::new(std::io::stdout()))),
            AuditTarget::File(path) => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                Sink::Writer(Mutex::new(Box::new(options.open(path)?)))
            }
        });
        let (queue, queued) = std::sync::mpsc::sync_channel(QUEUE);
        let writer = sink.clone();
        // Ends when the last sender (this Audit) is dropped.
        std::thread::Builder::new().name("tokenhub-audit".into()).spawn(move || {
            for item in queued {
                match item {
                    Queued::Line(l) => {
                        writer.write(l.at, l.event, l.user.as_deref(), l.version, l.detail.as_deref(), &l.request_id, &l.client)
                    }
                    Queued::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        })?;
        Ok(Self { sink, queue })
    }

    /// Records `event` for `user` (lineage `version`, and a fixed `detail`
    /// such as a refusal reason). Never pass a token value.
    pub fn record(&self, event: &str, user: Option<&str>, version: Option<i64>, detail: Option<&str>) {
        let at = time::OffsetDateTime::now_utc();
        // The request's context is read where it is, not copied.
        let written = CONTEXT.try_with(|c| self.sink.write(at, event, user, version, detail, &c.request_id, &c.client));
        if written.is_err() {
            self.sink.write(at, event, user, version, detail, &None, &None);
        }
    }

    /// [`Audit::record`] for the line every notebook fetch writes: the line
    /// is formatted and written by the writer thread, off the request's path
    /// (in order with the other fetch lines, a moment after it happened; its
    /// time is when it happened).
    pub fn record_off_path(&self, event: &'static str, user: &str, version: Option<i64>, detail: Option<&str>) {
        let (request_id, client) = CONTEXT.try_with(|c| (c.request_id.clone(), c.client.clone())).unwrap_or_default();
        let line = Line {
            at: time::OffsetDateTime::now_utc(),
            event,
            user: Some(user.to_string()),
            version,
            detail: detail.map(str::to_string),
            request_id,
            client,
        };
        if self.queue.send(Queued::Line(line)).is_err() {
            tracing::error!(event, "the audit writer thread is gone: a fetch line was not written");
        }
    }

    /// Waits until every fetch line recorded so far is written (at shutdown,
    /// and for tests that read the log).
    pub fn flush(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.queue.send(Queued::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

impl Sink {
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        at: time::OffsetDateTime,
        event: &str,
        user: Option<&str>,
        version: Option<i64>,
        detail: Option<&str>,
        request_id: &Option<String>,
        client: &Option<String>,
    ) {
        match self {
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
                let at = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
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
        // A fetch line, written by the audit's thread, with its context.
        let context = Context { request_id: Some("rid-2".into()), client: Some("10.1.2.4".into()) };
        CONTEXT.scope(context, async { audit.record_off_path("notebook_fetch", "carol", Some(5), None) }).await;
        audit.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["event"], "notebook_fetch");
        assert_eq!(lines[0]["user"], "alice");
        assert_eq!(lines[0]["client"], "10.1.2.3");
        assert_eq!(lines[0]["request_id"], "rid-1");
        assert_eq!(lines[0]["version"], 3);
        assert_eq!(lines[1]["client"], serde_json::Value::Null);
        assert_eq!(lines[1]["detail"], "user asked");
        assert_eq!((lines[2]["user"].as_str(), lines[2]["request_id"].as_str()), (Some("carol"), Some("rid-2")));
        assert_eq!((lines[2]["client"].as_str(), lines[2]["version"].as_i64()), (Some("10.1.2.4"), Some(5)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
