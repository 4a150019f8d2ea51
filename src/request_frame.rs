//! What every request passes, in one layer: its id (`x-request-id`, kept
//! if the proxy sent one, else made here, and answered back), its context
//! (request id, client address, method and URI: [`crate::audit::Context`],
//! a task-local the audit reads too), an error line for a 5xx answer, and
//! the security headers on the answer
//! ([`crate::security::add_security_headers`]). One layer costs the hot
//! path one boxed future where five stacked layers cost five.
//!
//! The log's request span (method and path only: query strings carry codes
//! and state) is made from that context when an event is written during the
//! request ([`RequestEvents`]), not for every request: made, formatted and
//! closed on every fetch whether anything was logged or not, it was a tenth
//! of the hot path's instructions.

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
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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

/// A request's span: its method, its path (never the query) and its id.
fn request_span(method: &Method, path: &str, request_id: &str) -> tracing::Span {
    tracing::info_span!("http", method = %method, path = %path, request_id)
}

/// The log's event formatter `F`, with the request span around each event
/// written while a request is served, made then from the request's context:
/// the same span the event had when one was made for every request (the
/// binary's tests read it in the text and the JSON log). The span is made
/// through the global subscriber, as `tokenhub serve` installs its log
/// (tracing gives a span made during an event nothing under a scoped one).
#[derive(Debug)]
pub struct RequestEvents<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for RequestEvents<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, writer: Writer<'_>, event: &tracing::Event<'_>) -> std::fmt::Result {
        let span = (event.is_contextual() && ctx.lookup_current().is_none())
            .then(|| {
                crate::audit::with_context(|c| {
                    let id = c.request_id.as_ref().and_then(|id| id.to_str().ok()).unwrap_or("-");
                    request_span(&c.method, c.uri.path(), id)
                })
            })
            .flatten();
        let _entered = span.as_ref().map(tracing::Span::enter);
        self.0.format_event(ctx, writer, event)
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
        let context = crate::audit::Context {
            request_id: Some(id.clone()),
            client: crate::security::client_of_request(&request),
            method: request.method().clone(),
            uri: request.uri().clone(),
        };
        // The clone that was made ready is the one that serves (tower's rule).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let started = Instant::now();
        Box::pin(async move {
            let Ok(mut response) = crate::audit::scope(context, async move {
                let answered = inner.call(request).await;
                if let Ok(response) = &answered
                    && response.status().is_server_error()
                {
                    let latency_ms = started.elapsed().as_millis() as u64;
                    tracing::error!(status = response.status().as_u16(), latency_ms, "response failed");
                }
                answered
            })
            .await;
            let headers = response.headers_mut();
            crate::security::add_security_headers(headers);
            headers.insert(X_REQUEST_ID.clone(), id);
            Ok(response)
        })
    }
}
