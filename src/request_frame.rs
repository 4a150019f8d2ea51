//! What every request passes, in one layer: its id (`x-request-id`, kept
//! if the proxy sent one, else made here, and answered back), its audit
//! context (request id and client address, [`crate::audit`]), its trace
//! span (method and path only: query strings carry codes and state), an
//! error line for a 5xx answer, and the security headers on the answer
//! ([`crate::security::add_security_headers`]). One layer costs the hot
//! path one boxed future where five stacked layers cost five. The text
//! log writes the span's fields through [`LogFields`], which every request
//! would otherwise pay tracing-subscriber's generic formatter for.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::header::HeaderName;
use axum::http::{HeaderValue, Method};
use axum::response::Response;
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// The request-id header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Wraps a service in the [`RequestFrame`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFrameLayer;

impl<S> Layer<S> for RequestFrameLayer {
    type Service = RequestFrame<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestFrame { inner }
    }
}

/// The service every request passes first (see the module's doc).
#[derive(Debug, Clone)]
pub struct RequestFrame<S> {
    inner: S,
}

/// A new request id: 16 random bytes, base64url. Ids name a request in the
/// logs and guard nothing, so they come from the thread's fast generator
/// (seeded from the OS), not a system call per request.
fn new_request_id() -> HeaderValue {
    use base64::Engine as _;
    use rand::Rng as _;
    let bytes: [u8; 16] = rand::thread_rng().r#gen();
    let mut text = [0u8; 22];
    let written = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode_slice(bytes, &mut text)
        .expect("16 bytes are 22 base64 characters");
    HeaderValue::from_bytes(&text[..written]).expect("base64url is a valid header value")
}

/// The names of the request span's fields, in their order.
const SPAN_FIELDS: [&str; 3] = ["method", "path", "request_id"];

/// A request's span: its method, its path (never the query) and its id.
pub fn request_span(method: &Method, path: &str, request_id: &str) -> tracing::Span {
    tracing::info_span!("http", method = %method, path = %path, request_id)
}

/// The text log's field formatter: the request span's fields, which every
/// request formats, written directly; everything else by
/// tracing-subscriber's [`DefaultFields`]. The bytes are DefaultFields'
/// without colours (a unit test holds them equal); with colours (a
/// terminal) DefaultFields writes them all.
#[derive(Debug, Default)]
pub struct LogFields;

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> std::fmt::Result {
        let mut names = SpanFieldNames::default();
        fields.record(&mut names);
        if names.seen != SPAN_FIELDS.len() || names.other || writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut written = SpanFieldsWriter { writer: &mut writer, first: true, result: Ok(()) };
        fields.record(&mut written);
        written.result
    }
}

/// Tells whether a set of fields is the request span's (the same names,
/// each once).
#[derive(Default)]
struct SpanFieldNames {
    /// Fields seen.
    seen: usize,
    /// Whether a field was not the span's field at its place.
    other: bool,
}

impl Visit for SpanFieldNames {
    fn record_debug(&mut self, field: &Field, _: &dyn std::fmt::Debug) {
        self.other |= SPAN_FIELDS.get(self.seen) != Some(&field.name());
        self.seen += 1;
    }
}

/// Writes the request span's fields as DefaultFields does without colours:
/// `name=value`, the value as `Debug` shows it, separated by a space.
struct SpanFieldsWriter<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    first: bool,
    result: std::fmt::Result,
}

impl Visit for SpanFieldsWriter<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let pad = if std::mem::take(&mut self.first) { "" } else { " " };
        self.result = write!(self.writer, "{pad}{}={value:?}", field.name());
    }
}

impl<S> Service<Request> for RequestFrame<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let id = match request.headers().get(&X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                request.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        let span = request_span(request.method(), request.uri().path(), id.to_str().unwrap_or("-"));
        let context =
            crate::audit::Context { request_id: Some(id.clone()), client: crate::security::client_of_request(&request) };
        // The clone that was made ready is the one that serves (tower's rule).
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        let started = Instant::now();
        Box::pin(async move {
            let mut inner = ready;
            let answered = crate::audit::scope(context, inner.call(request)).instrument(span.clone()).await;
            let Ok(mut response) = answered;
            if response.status().is_server_error() {
                let latency_ms = started.elapsed().as_millis() as u64;
                span.in_scope(|| tracing::error!(status = response.status().as_u16(), latency_ms, "response failed"));
            }
            let headers = response.headers_mut();
            crate::security::add_security_headers(headers);
            headers.insert(X_REQUEST_ID.clone(), id);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::Shared;

    /// What a subscriber with these fields writes for the same spans and
    /// events (no time, no colours).
    fn written<N>(fields: N) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Shared::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(fields)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let get = Method::GET;
            for (method, path, id) in [(&get, "/services/tokenhub/api/v1/tokens", "AbC-12_x"), (&Method::POST, "/a b/\"q\"", "-")]
            {
                request_span(method, path, id).in_scope(|| {
                    tracing::error!(status = 500u16, latency_ms = 3u64, "response failed");
                    tracing::warn!(user = "ann \"x\"", "a \"quoted\"\nmessage");
                });
            }
            // The same names in another order, fewer of them, or another
            // field among them: not the request span, DefaultFields writes them.
            tracing::info_span!("other", path = "/p", method = "GET", request_id = "r").in_scope(|| tracing::info!("one"));
            tracing::info_span!("fewer", method = "GET", path = "/p").in_scope(|| tracing::info!("two"));
            tracing::info_span!("more", method = "GET", path = "/p", request_id = "r", r#type = 1)
                .in_scope(|| tracing::info!(r#type = "t", "three"));
            let error = std::io::Error::other("disk \"full\"");
            tracing::warn!(error = &error as &(dyn std::error::Error + 'static), count = 2, flag = true, "four");
        });
        out.take()
    }

    /// The log's lines with [`LogFields`] are byte for byte DefaultFields'.
    #[test]
    fn log_fields_write_what_default_fields_write() {
        let (ours, theirs) = (written(LogFields), written(DefaultFields::new()));
        assert!(theirs.contains("http{method=GET path=/services/tokenhub/api/v1/tokens request_id=\"AbC-12_x\"}"), "{theirs}");
        assert_eq!(ours.lines().count(), 10, "{ours}");
        assert_eq!(ours, theirs);
    }
}
