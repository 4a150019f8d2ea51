//! What every request passes, in one layer: its id (`x-request-id`, kept
//! if the proxy sent one, else made here, and answered back), its audit
//! context (request id and client address, [`crate::audit`]), its trace
//! span (method and path only: query strings carry codes and state), an
//! error line for a 5xx answer, and the security headers on the answer
//! ([`crate::security::add_security_headers`]). One layer costs the hot
//! path one boxed future where five stacked layers cost five.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::http::header::HeaderName;
use axum::response::Response;
use tower::{Layer, Service};
use tracing::Instrument as _;

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
        let shown = id.to_str().ok();
        let span = tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id = shown.unwrap_or("-"));
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
