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
use std::net::IpAddr;
use std::sync::Mutex;

use axum::http::{HeaderValue, Method, Uri};

use serde_json::json;

use crate::config::{AuditTarget, LogFormat};

/// The request an event belongs to.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// `x-request-id` (a cheap clone; made text when a line is written).
    pub request_id: Option<HeaderValue>,
    /// The client address (see [`crate::security::client_of`]).
    pub client: Option<IpAddr>,
    /// The request's method, for the log's request span.
    pub method: Method,
    /// The request's URI (a cheap clone), for the log's request span,
    /// which shows its path only (query strings carry codes and state).
    pub uri: Uri,
}

tokio::task_local! {
    static CONTEXT: Context;
}

/// The client address of the request being served.
pub fn client() -> Option<String> {
    with_context(|c| c.client.map(|ip| ip.to_string())).flatten()
}

/// `f` of the context of the request being served, if any.
pub fn with_context<R>(f: impl FnOnce(&Context) -> R) -> Option<R> {
    CONTEXT.try_with(f).ok()
}

/// The longest request id kept in the audit log.
const MAX_AUDITED_ID: usize = 64;

/// A request id as the audit shows it: text only, at most
/// [`MAX_AUDITED_ID`] characters (a header value that is text is ASCII).
fn shown_id(id: Option<&HeaderValue>) -> Option<&str> {
    let id = id?.to_str().ok()?;
    Some(&id[..id.len().min(MAX_AUDITED_ID)])
}

/// Runs `future` (the rest of a request) with its [`Context`].
pub async fn scope<F: std::future::Future>(context: Context, future: F) -> F::Output {
    CONTEXT.scope(context, future).await
}

enum Sink {
    /// The normal log: through tracing, or straight into the log's own
    /// writer when tokenhub was given it ([`LogWriter`]).
    Log(Option<LogWriter>),
    Writer(Mutex<Box<dyn std::io::Write + Send>>),
}

/// The log's own writer (tracing-appender's queue to stderr) and format:
/// audit lines written into it directly are formatted here, byte for byte
/// as tracing-subscriber's formatter would (a test holds them equal),
/// without the generic formatter's per-field machinery, which was most of
/// a fetch line's cost.
pub struct LogWriter {
    writer: Mutex<Box<dyn std::io::Write + Send>>,
    format: LogFormat,
}

impl LogWriter {
    /// Audit lines in `format` go to `writer`, one `write` call per batch
    /// of whole lines (tracing-appender passes each call on as one piece).
    pub fn new(writer: Box<dyn std::io::Write + Send>, format: LogFormat) -> Self {
        Self { writer: Mutex::new(writer), format }
    }
}

/// The most fetch lines waiting for the writer thread (the queue's memory
/// is taken at start: about 150 bytes a line); a caller finding it full
/// waits for room (a line is never dropped).
const QUEUE: usize = 4096;

/// How long the writer thread lets fetch lines gather after the first.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

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
    request_id: Option<HeaderValue>,
    client: Option<IpAddr>,
}

impl Line {
    fn fields(&self) -> Fields<'_> {
        Fields {
            at: self.at,
            event: self.event,
            user: self.user.as_deref(),
            version: self.version,
            detail: self.detail.as_deref(),
            request_id: shown_id(self.request_id.as_ref()),
            client: self.client,
        }
    }
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
    /// With `log`, lines for the normal log are written into it directly.
    pub fn open(target: &AuditTarget, log: Option<LogWriter>) -> std::io::Result<Self> {
        let sink = std::sync::Arc::new(match target {
            AuditTarget::Log => Sink::Log(log),
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
            let mut batch = Vec::with_capacity(QUEUE);
            while let Ok(first) = queued.recv() {
                // A moment for the lines of a busy time to gather: one write
                // (and one wake of the log's thread) then serves them all,
                // where a wake per line cost more than the line.
                std::thread::sleep(BATCH_WAIT);
                batch.push(first);
                batch.extend(queued.try_iter().take(QUEUE));
                let lines: Vec<Fields> = batch
                    .iter()
                    .filter_map(|item| match item {
                        Queued::Line(l) => Some(l.fields()),
                        Queued::Flush(_) => None,
                    })
                    .collect();
                writer.write(&lines);
                for item in batch.drain(..) {
                    if let Queued::Flush(done) = item {
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
        let line = Fields { at, event, user, version, detail, request_id: None, client: None };
        let written = CONTEXT
            .try_with(|c| self.sink.write(&[Fields { request_id: shown_id(c.request_id.as_ref()), client: c.client, ..line }]));
        if written.is_err() {
            self.sink.write(&[line]);
        }
    }

    /// [`Audit::record`] for the line every notebook fetch writes: the line
    /// is formatted and written by the writer thread, off the request's path
    /// (in order with the other fetch lines, a moment after it happened; its
    /// time is when it happened).
    pub fn record_off_path(&self, event: &'static str, user: &str, version: Option<i64>, detail: Option<&str>) {
        let (request_id, client) = CONTEXT.try_with(|c| (c.request_id.clone(), c.client)).unwrap_or_default();
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
    /// Writes `lines`, formatted into one buffer and written at once.
    fn write(&self, lines: &[Fields<'_>]) {
        let mut out = Vec::with_capacity(256 * lines.len());
        let (writer, flush) = match self {
            Sink::Log(None) => return lines.iter().for_each(Fields::trace),
            Sink::Log(Some(log)) => {
                // The log's filter still decides whether audit lines are written.
                if !tracing::enabled!(target: "audit", tracing::Level::INFO) {
                    return;
                }
                for line in lines {
                    line.log_line(&mut out, log.format);
                }
                (&log.writer, false)
            }
            Sink::Writer(writer) => {
                for line in lines {
                    line.file_line(&mut out);
                }
                (writer, true)
            }
        };
        let mut writer = writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // An audit line that cannot be written is logged, not fatal.
        if let Err(e) = writer.write_all(&out).and_then(|_| if flush { writer.flush() } else { Ok(()) }) {
            drop(writer);
            tracing::error!(error = %e, "writing the audit log failed");
        }
    }
}

/// An audit line's fields, as the log shows them (`-`, `-1` and an empty
/// detail for what is missing, as in the line tracing writes).
struct Fields<'a> {
    at: time::OffsetDateTime,
    event: &'a str,
    user: Option<&'a str>,
    version: Option<i64>,
    detail: Option<&'a str>,
    request_id: Option<&'a str>,
    client: Option<IpAddr>,
}

impl Fields<'_> {
    /// The line through tracing (target `audit`).
    fn trace(&self) {
        let client = self.client.map(|ip| ip.to_string());
        tracing::info!(
            target: "audit",
            event = self.event,
            user = self.user.unwrap_or("-"),
            client = client.as_deref().unwrap_or("-"),
            version = self.version.unwrap_or(-1),
            request_id = self.request_id.unwrap_or("-"),
            detail = self.detail.unwrap_or(""),
            "audit"
        )
    }

    /// The line as tracing-subscriber's formatter writes it: text,
    /// `<time>  INFO audit: audit event="…" … detail="…"`; or JSON, time,
    /// level, the fields (message first), then the target.
    fn log_line(&self, out: &mut Vec<u8>, format: LogFormat) {
        let json = format == LogFormat::Json;
        if json {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(out, self.at);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"audit\"");
        } else {
            timestamp(out, self.at);
            out.extend_from_slice(b"  INFO audit: audit");
        }
        let mut version = itoa::Buffer::new();
        let client = self.client.map(IpText::new);
        for (name, value, quoted) in [
            ("event", self.event, true),
            ("user", self.user.unwrap_or("-"), true),
            ("client", client.as_ref().map_or("-", IpText::as_str), true),
            ("version", version.format(self.version.unwrap_or(-1)), false),
            ("request_id", self.request_id.unwrap_or("-"), true),
            ("detail", self.detail.unwrap_or(""), true),
        ] {
            out.extend_from_slice(if json { b",\"" } else { b" " });
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(if json { b"\":" } else { b"=" });
            match (quoted, json) {
                (false, _) => out.extend_from_slice(value.as_bytes()),
                (true, true) => serde_json::to_writer(&mut *out, value).expect("a string serializes"),
                (true, false) => debug_str(out, value),
            }
        }
        out.extend_from_slice(if json { b"},\"target\":\"audit\"}\n" } else { b"\n" });
    }

    /// The audit file's JSON line (`null` for what is missing).
    fn file_line(&self, out: &mut Vec<u8>) {
        let at = self.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let line = json!({
            "ts": at,
            "event": self.event,
            "user": self.user,
            "client": self.client.map(|ip| ip.to_string()),
            "version": self.version,
            "request_id": self.request_id,
            "detail": self.detail,
        });
        let _ = writeln!(out, "{line}");
    }
}

/// An address as `Display` writes it, without allocating: a fetch line's
/// client was a string made and dropped per fetch.
struct IpText {
    bytes: [u8; 45],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut text = Self { bytes: [0; 45], len: 0 };
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b".");
                    }
                    text.push(itoa::Buffer::new().format(octet).as_bytes());
                }
            }
            IpAddr::V6(v6) => {
                // The longest IPv6 text (an IPv4 tail) is 45 bytes.
                let mut cursor = std::io::Cursor::new(&mut text.bytes[..]);
                let _ = write!(cursor, "{v6}");
                text.len = cursor.position() as usize;
            }
        }
        text
    }

    fn push(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("an address's text is ASCII")
    }
}

/// A string quoted and escaped as Rust's `Debug` does (what tracing's
/// text format writes for a string field).
fn debug_str(out: &mut Vec<u8>, value: &str) {
    if value.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// `2026-12-07T13:01:02.123456Z`, as tracing-subscriber's default timer.
fn timestamp(out: &mut Vec<u8>, at: time::OffsetDateTime) {
    let at = at.to_offset(time::UtcOffset::UTC);
    padded(out, at.year().max(0) as u32, 4);
    let parts = [
        (b'-', u32::from(u8::from(at.month())), 2),
        (b'-', u32::from(at.day()), 2),
        (b'T', u32::from(at.hour()), 2),
        (b':', u32::from(at.minute()), 2),
        (b':', u32::from(at.second()), 2),
        (b'.', at.microsecond(), 6),
    ];
    for (separator, value, width) in parts {
        out.push(separator);
        padded(out, value, width);
    }
    out.push(b'Z');
}

/// `value` in decimal, zero-padded to `width` digits.
fn padded(out: &mut Vec<u8>, value: u32, width: usize) {
    let mut buffer = itoa::Buffer::new();
    let text = buffer.format(value);
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(text.len())));
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_lines_are_json_with_the_request_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(&AuditTarget::File(path.clone()), None).unwrap();
        let context = Context {
            request_id: Some(HeaderValue::from_static("rid-1")),
            client: Some("10.1.2.3".parse().unwrap()),
            ..Context::default()
        };
        CONTEXT.scope(context, async { audit.record("notebook_fetch", Some("alice"), Some(3), None) }).await;
        audit.record("revoke", Some("bob"), None, Some("user asked"));
        // A fetch line, written by the audit's thread, with its context.
        let context = Context {
            request_id: Some(HeaderValue::from_static("rid-2")),
            client: Some("10.1.2.4".parse().unwrap()),
            ..Context::default()
        };
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

    /// A buffer both tracing and the audit write into.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        /// What was written so far, taken out.
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    /// Addresses as `Display` writes them, the longest IPv6 included.
    #[test]
    fn ip_text_is_display() {
        for ip in ["0.0.0.0", "10.1.2.3", "255.255.255.255", "::", "2001:db8::1", "::ffff:255.255.255.255"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
        let longest: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(IpText::new(longest).as_str(), longest.to_string());
    }

    /// The time tracing's default timer wrote at the start of `line`.
    fn time_of(line: &str) -> time::OffsetDateTime {
        let n = |range: std::ops::Range<usize>| line[range].parse::<u32>().unwrap();
        let month = time::Month::try_from(n(5..7) as u8).unwrap();
        let date = time::Date::from_calendar_date(n(0..4) as i32, month, n(8..10) as u8).unwrap();
        let clock = time::Time::from_hms_micro(n(11..13) as u8, n(14..16) as u8, n(17..19) as u8, n(20..26)).unwrap();
        time::PrimitiveDateTime::new(date, clock).assume_utc()
    }

    /// The audit's own lines in the log are byte for byte those tracing's
    /// formatter writes for the same event, text and JSON, with names that
    /// need escaping and fields missing, several lines in one write.
    #[test]
    fn lines_written_into_the_log_are_tracings_own() {
        let through_tracing = Audit::open(&AuditTarget::Log, None).unwrap();
        // Event, user, version, detail, request id, client.
        type Case<'a> = (&'a str, Option<&'a str>, Option<i64>, Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let cases: [Case; 3] = [
            ("notebook_fetch", Some("alice"), Some(7), None, Some("rid-1"), Some("10.0.0.1")),
            ("refused", None, None, Some("unknown token"), None, None),
            ("refresh", Some("bob \"the\\ user\"\n\u{7f}é"), Some(-3), Some("tab\there"), Some("ü"), None),
        ];
        for format in [LogFormat::Text, LogFormat::Json] {
            let (theirs, ours) = (Shared::default(), Shared::default());
            let direct = Audit::open(&AuditTarget::Log, Some(LogWriter::new(Box::new(ours.clone()), format))).unwrap();
            let writer = theirs.clone();
            let builder = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone());
            let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
                LogFormat::Text => Box::new(builder.finish()),
                LogFormat::Json => Box::new(builder.json().finish()),
            };
            tracing::subscriber::with_default(subscriber, || {
                let (mut expected, mut lines) = (String::new(), Vec::new());
                for (event, user, version, detail, request_id, client) in cases {
                    let client = client.map(|c| c.parse().unwrap());
                    let line = |at| Fields { at, event, user, version, detail, request_id, client };
                    through_tracing.sink.write(&[line(time::OffsetDateTime::now_utc())]);
                    let theirs = theirs.take();
                    lines.push(line(time_of(theirs.trim_start_matches("{\"timestamp\":\""))));
                    expected.push_str(&theirs);
                }
                // Written together, as the writer thread writes a batch.
                direct.sink.write(&lines);
                assert_eq!(ours.take(), expected, "{format:?}");
            });
        }
    }
}
